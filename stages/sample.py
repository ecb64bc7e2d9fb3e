"""`confrank sample --out DIR`: write the embedded demo dataset in the WiderFace layout.

Writes ``DIR/WIDER_val/images/0--Demo/*.jpg``, ``DIR/wider_face_split/wider_face_val_bbx_gt.txt``
and ``DIR/ground_truth/wider_{face,easy,medium,hard}_val.mat`` (the official layout, so
`confrank index --root DIR` treats it like real WiderFace). See ``pipeline.sample``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import click
import cv2
import numpy as np
from scipy.io import savemat

from pipeline.sample import Scene, compose_dataset, subset_masks
from pipeline.atomic_io import atomic_output

EVENT = "0--Demo"


def _cell(items: list) -> np.ndarray:
    out = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        out[i, 0] = item
    return out


def _savemat(path: Path, variables: dict) -> None:
    """savemat with a fixed 116-byte text header (scipy's carries the creation time)."""
    buffer = io.BytesIO()
    savemat(buffer, variables, format="5")
    data = b"MATLAB 5.0 MAT-file, written by confrank sample".ljust(116) + buffer.getvalue()[116:]
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _write_mats(folder: Path, names: list[str], scenes: list[Scene]) -> None:
    boxes = [np.column_stack([s.boxes[:, :2], s.boxes[:, 2:] - s.boxes[:, :2]]).round(1) for s in scenes]
    zeros = [np.zeros((len(b), 1), dtype=np.uint8) for b in boxes]
    face = {
        "event_list": _cell([np.array([EVENT])]),
        "file_list": _cell([_cell([np.array([n]) for n in names])]),
        "face_bbx_list": _cell([_cell(boxes)]),
        **{f"{a}_label_list": _cell([_cell(zeros)]) for a in
           ("blur", "expression", "illumination", "invalid", "occlusion", "pose")},
    }
    _savemat(folder / "wider_face_val.mat", face)
    for subset in ("easy", "medium", "hard"):
        keep = [np.flatnonzero(subset_masks(s.boxes)[subset]).reshape(-1, 1) + 1 for s in scenes]
        _savemat(folder / f"wider_{subset}_val.mat", {**face, "gt_list": _cell([_cell([k.astype(np.uint16) for k in keep])])})


def _split_txt(names: list[str], scenes: list[Scene]) -> str:
    lines = []
    for name, scene in zip(names, scenes):
        lines += [f"{EVENT}/{name}.jpg", str(len(scene.boxes))]
        for x1, y1, x2, y2 in scene.boxes:
            lines.append(f"{x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f} 0 0 0 0 0 0 ")
    return "\n".join(lines) + "\n"


def write_sample(out: Path, n_images: int, seed: int) -> int:
    """Write the dataset under ``out`` (replacing an earlier one); returns the face count."""
    scenes = compose_dataset(n_images, seed)
    names = [f"0_Demo_scene_{i:03d}" for i in range(n_images)]
    for sub in ("WIDER_val", "wider_face_split", "ground_truth"):
        shutil.rmtree(out / sub, ignore_errors=True)
    image_dir = out / "WIDER_val" / "images" / EVENT
    for name, scene in zip(names, scenes):
        ok, data = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        with atomic_output(image_dir / f"{name}.jpg") as tmp:
            tmp.write_bytes(data.tobytes())
    with atomic_output(out / "wider_face_split" / "wider_face_val_bbx_gt.txt") as tmp:
        tmp.write_text(_split_txt(names, scenes))
    _write_mats(out / "ground_truth", names, scenes)
    return sum(len(s.boxes) for s in scenes)


@click.command("sample")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--images", "n_images", default=8, show_default=True, help="Number of scenes.")
@click.option("--seed", default=0, show_default=True)
def cli(out: Path, n_images: int, seed: int) -> None:
    """Build the embedded demo dataset (WiderFace layout) from a photo shipped with matplotlib."""
    faces = write_sample(out, n_images, seed)
    click.echo(f"sample: {n_images} images, {faces} faces -> {out}")
