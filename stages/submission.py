"""``confrank import`` / ``confrank export``: WiderFace submission folders (one txt per image).

Import accepts ``DIR/<event>/<name>.txt`` and any extra leading folders
(``DIR/widerface_txt/<event>/<name>.txt``): a file belongs to the image of the dataset whose
id is the longest tail of its path. It writes detection shards (scale 0, flip false, as
given) and the final boxes of method ``imported`` (scored as is, no NMS). Export writes the
final boxes of a method as such a folder, one file per image of the dataset (empty images
get a count of 0), boxes sorted by score.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import click
import numpy as np
import pandas as pd

from pipeline.errors import ConfrankError, FormatError, MissingInputError
from pipeline.provenance import provenance
from pipeline.tables import read_table, shard_members, write_table
from pipeline.submission import format_submission, parse_submission, submission_frame
from stages.common import DETECTION_SORT, method_name, method_options, scales_option
from stages.layout import Layout, data_dir_option

IMPORTED = "imported"


def dataset_image_ids(layout: Layout, dataset: str) -> list[str]:
    """Every image id of ``dataset`` (images table, else gt table)."""
    for path in (layout.images(dataset), layout.gt(dataset)):
        if path.is_file():
            return sorted(set(read_table(path, path.stem, ["image_id"])["image_id"].astype(str)))
    raise MissingInputError(f"{layout.images(dataset)}: dataset {dataset!r} is not indexed; run `confrank index --name {dataset} --root DIR` first")


def _image_of(rel: Path, known: set[str]) -> str | None:
    parts = list(rel.with_suffix("").parts)
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if candidate in known:
            return candidate
    return None


def read_submission_folder(folder: Path, known: set[str]) -> tuple[pd.DataFrame, str]:
    """(boxes as image_id, x1..y2, score float64; sha256 over the files) of a submission folder."""
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise MissingInputError(f"{folder}: no .txt files (expected <event>/<image>.txt per image)")
    digest = hashlib.sha256()
    frames, seen = [], {}
    for path in files:
        rel = path.relative_to(folder)
        image_id = _image_of(rel, known)
        if image_id is None:
            raise FormatError(path, "a file named after an image of the dataset (<event>/<image>.txt)", got=str(rel))
        if image_id in seen:
            raise FormatError(path, f"one file per image, but {seen[image_id]} is also {image_id}")
        seen[image_id] = rel
        data = path.read_bytes()
        digest.update(str(rel).encode() + b"\0" + data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(path, "UTF-8 text") from None
        _, boxes = parse_submission(text, str(path), expected_name=image_id.rsplit("/", 1)[-1])
        frames.append(submission_frame(image_id, boxes))
    return pd.concat(frames, ignore_index=True), digest.hexdigest()


@click.command("import")
@click.option("--dataset", required=True, help="Indexed dataset the submission is for.")
@click.option("--detector", required=True, help="Name to store the boxes under.")
@click.option("--txt", "txt_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Submission folder.")
@scales_option("original", help="Scale-set name to store the boxes under.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True, help="Number of detection shards to write.")
@data_dir_option
def import_cli(dataset: str, detector: str, txt_dir: Path, scales: str, shards: int, data_dir: Path) -> None:
    """Import a WiderFace submission folder as detections and as final boxes (method `imported`)."""
    layout = Layout(data_dir)
    ids = dataset_image_ids(layout, dataset)
    boxes, digest = read_submission_folder(txt_dir, set(ids))
    config = {"dataset": dataset, "detector": detector, "scales": scales, "method": IMPORTED, "shards": shards,
              "submission_sha256": digest, "submission": txt_dir.name, "score_transform": "none"}
    dets = boxes.assign(detector=detector, scale=np.int32(0), flip=False)
    for k in range(shards):
        members = set(shard_members(ids, shards, k))
        part = dets[dets["image_id"].isin(members)]
        write_table(part, layout.detections(dataset, detector, scales, k), "detections",
                    metadata=provenance("import", {**config, "shard": f"{k}/{shards}"}, detector=detector), sort_by=DETECTION_SORT)
    path = layout.final(dataset, detector, scales, IMPORTED)
    write_table(boxes, path, "final", metadata=provenance("import", config, detector=detector), sort_by=DETECTION_SORT)
    click.echo(f"imported {len(boxes)} boxes of {boxes['image_id'].nunique()} images into {path}")


def write_submission_folder(final: pd.DataFrame, image_ids: list[str], folder: Path, force: bool) -> None:
    """Write one txt per image into ``folder``, built beside it and renamed into place."""
    if folder.exists() and any(folder.iterdir()) and not force:
        raise ConfrankError(f"{folder}: folder exists and is not empty (use --force to replace it)")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        groups = dict(tuple(final.groupby("image_id", sort=False, observed=True)))
        empty = final.iloc[:0]
        for image_id in image_ids:
            target = tmp / f"{image_id}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(format_submission(image_id, groups.get(image_id, empty)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@click.command("export")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--detector", required=True, help="Detector name.")
@method_options
@scales_option("original", help="Scale set of the final boxes.")
@click.option("--txt", "txt_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@data_dir_option
def export_cli(dataset: str, detector: str, method: str, scales: str, ranker: str | None, txt_dir: Path, force: bool, data_dir: Path) -> None:
    """Export final boxes as a WiderFace submission folder (<event>/<image>.txt)."""
    layout = Layout(data_dir)
    name = method_name(method, ranker)
    path = layout.final(dataset, detector, scales, name)
    if not path.is_file():
        raise MissingInputError(f"{path}: no final boxes; run `confrank nms` (or `confrank import`) for this method first")
    final = read_table(path, "final")
    final["image_id"] = final["image_id"].astype(str)
    ids = dataset_image_ids(layout, dataset)
    unknown = sorted(set(final["image_id"]) - set(ids))
    if unknown:
        raise ConfrankError(f"{path}: boxes for images not in dataset {dataset!r}, e.g. {unknown[:3]}")
    write_submission_folder(final, ids, txt_dir, force)
    click.echo(f"wrote {len(ids)} files ({len(final)} boxes) to {txt_dir}")
