"""Stage `index`: a dataset folder -> ``images.parquet`` and ``gt.parquet``.

WiderFace layout (``--format widerface``) under ``--root``::

    WIDER_{split}/images/<event>/<name>.jpg             images (optional for scoring only)
    wider_face_split/wider_face_{split}_bbx_gt.txt      boxes + attributes
    ground_truth/wider_{face,easy,medium,hard}_val.mat  official evaluation truth (val)
    {split}/label.txt or retinaface_labels/{split}_label.txt   RetinaFace landmarks format

The ground truth comes from the official .mat files when present (they carry the
easy/medium/hard keep lists), else from the split text file, else from label.txt. When the
.mat files and the text file are both present their boxes are cross-checked and any
difference is reported as a warning. When the images folder is absent the dataset is indexed
for scoring only (width/height empty); when it is present, every listed image must exist.

Generic box sets (``--format boxes``): ``--root`` holds the images (any sub-folders) and
``--boxes`` (default ``ROOT/boxes.csv`` or ``ROOT/boxes.parquet``) the rows
``image, x1, y1, x2, y2[, ignore]`` with ``image`` relative to the root.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from pipeline.errors import FormatError, MissingInputError
from pipeline.imaging import image_size
from pipeline.provenance import provenance
from pipeline.tables import write_table
from pipeline.widerface import (
    IMAGE_SUFFIXES,
    Annotations,
    check_same_boxes,
    parse_box_table,
    parse_eval_mat,
    parse_retinaface_labels,
    parse_split_txt,
)
from stages.layout import Layout, data_dir_option

log = logging.getLogger(__name__)


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def load_widerface(root: Path, split: str, labels: Path | None = None) -> tuple[Annotations, Path | None, dict]:
    """Annotations of a WiderFace-layout folder, its images folder (or None) and what was used."""
    mat_dir = _first_existing(root / "ground_truth", root / "eval_tools" / "ground_truth")
    txt = _first_existing(root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt")
    label = labels or _first_existing(root / split / "label.txt", root / "retinaface_labels" / f"{split}_label.txt")
    sources: dict[str, str] = {}
    if mat_dir is not None and (mat_dir / "wider_face_val.mat").exists() and split == "val":
        ann = parse_eval_mat(mat_dir)
        sources["gt"] = str(mat_dir / "wider_face_val.mat")
        if txt is not None:
            for problem in check_same_boxes(parse_split_txt(txt).gt, ann.gt):
                log.warning("%s and %s differ: %s", txt, mat_dir, problem)
            sources["cross_checked"] = str(txt)
    elif txt is not None:
        ann = parse_split_txt(txt)
        sources["gt"] = str(txt)
    elif label is not None:
        ann = parse_retinaface_labels(label)
        sources["gt"] = str(label)
    else:
        raise MissingInputError(
            f"{root}: no WiderFace annotations for split {split!r}: expected ground_truth/wider_face_val.mat, "
            f"wider_face_split/wider_face_{split}_bbx_gt.txt or {split}/label.txt"
        )
    images_dir = _first_existing(root / f"WIDER_{split}" / "images", root / split / "images")
    return ann, images_dir, sources


def load_boxes(root: Path, boxes: Path | None) -> Annotations:
    """Annotations of a generic box set: every image under ``root`` plus the box table."""
    table_path = boxes or _first_existing(root / "boxes.csv", root / "boxes.parquet")
    if table_path is None or not table_path.exists():
        raise MissingInputError(f"{root}: no box table: expected --boxes FILE, {root / 'boxes.csv'} or {root / 'boxes.parquet'}")
    try:
        table = pd.read_parquet(table_path) if table_path.suffix == ".parquet" else pd.read_csv(table_path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise FormatError(table_path, "a CSV or Parquet table image,x1,y1,x2,y2[,ignore]", got=str(exc)) from exc
    files = [str(p.relative_to(root)).replace("\\", "/") for p in sorted(root.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return parse_box_table(table, table_path, files)


def images_table(ann: Annotations, images_dir: Path | None, root: Path, split: str) -> pd.DataFrame:
    """The ``images`` table: paths relative to ``root``, sizes from the file headers.

    Without an images folder, width and height are left empty (scoring-only dataset).
    """
    frame = ann.images.copy()
    if images_dir is None:
        frame["path"] = [f"WIDER_{split}/images/{f}" for f in frame.file]
        frame["width"] = pd.array([None] * len(frame), dtype="Int32")
        frame["height"] = pd.array([None] * len(frame), dtype="Int32")
    else:
        paths = [images_dir / f for f in frame.file]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingInputError(f"{missing[0]}: image listed in the annotations is missing{more}")
        sizes = [image_size(p) for p in paths]
        frame["path"] = [str(p.relative_to(root)).replace("\\", "/") for p in paths]
        frame["width"] = pd.array([s[0] for s in sizes], dtype="Int32")
        frame["height"] = pd.array([s[1] for s in sizes], dtype="Int32")
    frame["split"] = split
    return frame[["image_id", "path", "width", "height", "split", "event"]]


def run_index(name: str, root: Path, fmt: str, split: str, layout: Layout,
              boxes: Path | None = None, labels: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Index one dataset and write its two tables; returns (images, gt)."""
    root = root.resolve()
    if not root.is_dir():
        raise MissingInputError(f"{root}: dataset root is not a folder")
    if fmt == "widerface":
        ann, images_dir, sources = load_widerface(root, split, labels)
    else:
        ann = load_boxes(root, boxes)
        images_dir, sources = root, {"gt": str(boxes or "boxes table")}
    images = images_table(ann, images_dir, root, split)
    meta = provenance(
        "index",
        {"name": name, "format": fmt, "split": split},
        inputs=[p for p in sources.values() if Path(p).is_file()],
        root=str(root), has_subsets=ann.has_subsets, images_present=images_dir is not None,
        gt_source=sources.get("gt", ""),
    )
    write_table(images, layout.images(name), "images", meta, sort_by=[("image_id", "ascending")])
    write_table(ann.gt, layout.gt(name), "gt", meta, sort_by=[("image_id", "ascending"), ("gt_id", "ascending")])
    return images, ann.gt


@click.command("index")
@click.option("--name", required=True, help="Dataset name used in every output path.")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path), help="Dataset folder.")
@click.option("--format", "fmt", type=click.Choice(["widerface", "boxes"]), default="widerface", show_default=True)
@click.option("--split", default="val", show_default=True, help="WiderFace split (train, val, test).")
@click.option("--boxes", type=click.Path(dir_okay=False, path_type=Path), help="Box table for --format boxes.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help="A RetinaFace label.txt to use.")
@data_dir_option
def cli(name: str, root: Path, fmt: str, split: str, boxes: Path | None, labels: Path | None, data_dir: Path) -> None:
    """Ingest a dataset into images/gt tables under DATA/interim/index/NAME/."""
    logging.basicConfig(level=logging.WARNING, format="confrank: warning: %(message)s")
    layout = Layout.from_env(data_dir)
    images, gt = run_index(name, root, fmt, split, layout, boxes, labels)
    click.echo(f"index {name}: {len(images)} images, {len(gt)} faces -> {layout.index_dir(name)}")
