"""What the ranker stages read and write: training data, the rows to score, a ranker's folder.

``confrank train``, ``rerank`` and ``cv`` read through here, and :func:`train` (the training
of ``confrank train`` and of every ``cv`` fold) writes a ranker's folder. A kind says what it reads
(:data:`pipeline.ranker.registry.READS`):

- ``boxes``: oracle-annotated box groups of each training image, and the images themselves
  (``oracle`` shards; the images table for paths and sizes);
- ``features``: per-box feature rows (``confrank features`` shards, computed on the fly when
  absent; with the other detectors of the ranker's evidence set), joined with the image
  evidence columns (``confrank image-features`` shards) when the ranker reads them.

Rows to score come in the same form, per shard of one detector, in the shard's stored order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.atomic_io import atomic_output, write_text_atomic
from pipeline.errors import ConfrankError, FormatError, MissingInputError
from pipeline.imaging import decode_image
from pipeline.provenance import provenance
from pipeline.ranker.registry import BoxData, Fitted, FitRun, RankerKind, ScoreContext, settings_of
from pipeline.tables import read_metadata, read_table, read_tables, shard_paths, write_table
from stages.common import pick_device
from stages.featurestore import feature_shards, source_shards
from stages.layout import Layout

#: columns of the oracle shards a ``boxes`` ranker trains on
ORACLE_COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score", "oracle_iou"]
#: columns of a scored frame that are not features (kept in re-ranked shards)
DETECTION_COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score", "oracle_iou", "gt_id"]
#: ground-truth columns: nothing a ranker reads may be derived from them
GT_COLUMNS = ("oracle_iou", "gt_id")


class ImageReader:
    """Picklable ``key -> RGB uint8 image`` for DataLoader workers; checks the decoded size
    against the images table and names the file on failure."""

    def __init__(self, paths: dict[str, tuple[str, int, int]]):
        self.paths = paths

    def __call__(self, key: str) -> np.ndarray:
        path, width, height = self.paths[key]
        return read_rgb(path, width, height)


def read_rgb(path: str, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Decode ``path`` as RGB uint8 with the one decode of every stage (stored pixel order,
    EXIF orientation ignored); FormatError naming the file when unreadable or when its
    size differs from the (width, height) recorded in the images table."""
    return cv2.cvtColor(decode_image(path, None if width is None else (width, height)), cv2.COLOR_BGR2RGB)


def load_images_table(layout: Layout, dataset: str) -> tuple[pd.DataFrame, Path]:
    """The images table of ``dataset`` with a resolved ``abspath`` column, and its file."""
    path = layout.images(dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: no images table for dataset {dataset!r}; run `confrank index --name {dataset} ...`")
    table = read_table(path, "images")
    table["image_id"] = table["image_id"].astype(str)
    root = Path(read_metadata(path).get("root", "."))
    table["abspath"] = [p if os.path.isabs(p) else str(root / p) for p in table["path"]]
    return table, path


def read_id_file(path: Path) -> list[str]:
    """Image ids, one per line (blank lines and ``#`` comments ignored)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: image id list not found")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise FormatError(path, "at least one image id (one per line)")
    return ids


def select_ids(all_ids: list[str], half: str | None, id_file: Path | None, dataset: str) -> list[str]:
    """The image ids to train on: all, one half (:func:`pipeline.ranker.data.split_half`) or those listed."""
    from pipeline.ranker.data import split_half

    ids = sorted(all_ids)
    if half:
        ids = split_half(ids, half)
    if id_file is not None:
        wanted = read_id_file(id_file)
        known = set(all_ids)
        if all(i not in known for i in wanted):
            raise FormatError(id_file, f"image ids of dataset {dataset!r}", got=wanted[0])
        keep = set(wanted)
        ids = [i for i in ids if i in keep]
    return ids


def chosen_images(layout: Layout, datasets: list[str], half: str | None, id_file: Path | None) -> dict[str, set[str]]:
    """``{dataset: image ids}`` that ``--split-half`` / ``--images`` select (all by default)."""
    out = {}
    for dataset in datasets:
        table, _ = load_images_table(layout, dataset)
        out[dataset] = set(select_ids(table["image_id"].tolist(), half, id_file, dataset))
    return out


def _oracle_parts(layout: Layout, dataset: str, det: str, scales: str) -> list[Path]:
    parts = shard_paths(layout.oracle_dir(dataset, det, scales))
    if not parts:
        raise MissingInputError(f"{layout.oracle_dir(dataset, det, scales)}: no oracle shards; run "
                                f"`confrank oracle --dataset {dataset} --detector {det} --scales {scales}` first")
    return parts


def load_box_data(layout: Layout, datasets: list[str], detectors: list[str], scales: str,
                  chosen: Mapping[str, set[str]]) -> tuple[BoxData, list[Path], list[tuple[str, str]]]:
    """Training images of the chosen ids with their oracle-annotated box groups, the files
    read, and the (dataset, image id) of every image trained on."""
    from pipeline.ranker.data import TrainImage, box_groups

    images, paths, inputs, trained = [], {}, [], []
    for dataset in datasets:
        table, table_path = load_images_table(layout, dataset)
        inputs.append(table_path)
        frames = []
        for det in detectors:
            parts = _oracle_parts(layout, dataset, det, scales)
            inputs.extend(parts)
            df = read_tables(parts, "detections", columns=None)
            if "oracle_iou" not in df.columns:
                raise FormatError(parts[0], "detections with an oracle_iou column (oracle shards)")
            df = df[ORACLE_COLUMNS]
            frames.append(df[df["image_id"].astype(str).isin(chosen[dataset])])
        groups: dict[str, list] = {}
        for g in box_groups(pd.concat(frames, ignore_index=True)):
            groups.setdefault(g.image_id, []).append(g)
        for row in table[table["image_id"].isin(groups)].itertuples(index=False):
            key = f"{dataset}\t{row.image_id}"
            images.append(TrainImage(key, int(row.width), int(row.height), tuple(groups[row.image_id])))
            paths[key] = (row.abspath, int(row.width), int(row.height))
            trained.append((dataset, row.image_id))
    if not images:
        raise ConfrankError(f"no training image has detections in {datasets} x {detectors} at scales {scales}")
    return BoxData(images, ImageReader(paths)), inputs, trained


#: the settings of ``confrank image-features`` that change what its columns mean
IMAGE_EVIDENCE_KEYS = ("evidence_net", "max_side")


def image_evidence_record(path: Path) -> dict[str, Any]:
    """The :data:`IMAGE_EVIDENCE_KEYS` settings an image-features shard was made with (its
    provenance), e.g. ``{"evidence_net": "retinaface-mnet025", "max_side": 1024}``."""
    config = read_metadata(path).get("config") or {}
    return {key: config.get(key) for key in IMAGE_EVIDENCE_KEYS}


def _with_image_features(layout: Layout, dataset: str, det: str, scales: str, shard: int, frame: pd.DataFrame,
                         expect: Mapping[str, Any] | None) -> tuple[pd.DataFrame, list[Path]]:
    """``frame`` (one shard's rows) with the image evidence columns of ``confrank image-features``;
    ConfrankError when the shard was made with other settings than ``expect`` (None: any)."""
    from pipeline.ranker.image_evidence import IMAGE_FEATURES

    path = layout.image_features(dataset, det, scales, shard)
    command = f"confrank image-features --dataset {dataset} --detector {det} --scales {scales}"
    if not path.is_file():
        raise MissingInputError(f"{path}: no image evidence; run `{command}` first")
    if expect is not None and (made := image_evidence_record(path)) != dict(expect):
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in expect.items())
        raise ConfrankError(f"{path}: image evidence made with {made}, but the ranker was trained on {dict(expect)}; "
                            f"rerun `{command} {options}`")
    evidence = read_table(path, "image_features")
    keys = ["x1", "y1", "x2", "y2", "score"]
    if len(evidence) != len(frame) or not np.array_equal(evidence[keys].to_numpy(), frame[keys].to_numpy()):
        raise ConfrankError(f"{path}: rows differ from the detector's shard {shard}; rerun `{command}`")
    added = pd.DataFrame({c: evidence[c].to_numpy(np.float32) for c in IMAGE_FEATURES}, index=frame.index)
    return pd.concat([frame.drop(columns=list(IMAGE_FEATURES), errors="ignore"), added], axis=1), [path]


def image_evidence_of(inputs: Iterable[Path]) -> dict[str, Any] | None:
    """The one image-evidence record (:func:`image_evidence_record`) of the image-features shards
    among ``inputs``; None when there are none. ConfrankError naming two shards that differ: one
    ranker reads one kind of evidence."""
    records: dict[tuple, Path] = {}
    for path in inputs:
        if len(path.parents) > 3 and path.parents[3].name == "image_features":
            records.setdefault(tuple(sorted(image_evidence_record(path).items())), path)
    if len(records) > 1:
        (a, path_a), (b, path_b) = list(records.items())[:2]
        raise ConfrankError(f"image evidence made with different settings: {path_a} ({dict(a)}) and {path_b} ({dict(b)}); "
                            f"rerun `confrank image-features` with one --evidence-net and --max-side for all")
    return dict(next(iter(records))) if records else None


def ranker_shards(layout: Layout, kind: RankerKind, settings: Any, dataset: str, det: str,
                  scales: str, image_evidence: Mapping[str, Any] | None = None) -> list[tuple[int, pd.DataFrame, list[Path]]]:
    """The rows a ranker of ``kind`` reads for one detector: (shard index, frame, files read) per
    shard, rows in stored order; ``image_id`` and ``detector`` as plain strings. A ranker that
    reads the image evidence gets it from shards made with ``image_evidence`` (the settings it
    was trained on; None: any, for training)."""
    if kind.reads == "features":
        evidence = settings.evidence_set
        shards = feature_shards(layout, dataset, det, scales, evidence if evidence else None)
        if settings.image_features:
            joined = []
            for shard, frame, inputs in shards:
                frame, more = _with_image_features(layout, dataset, det, scales, shard, frame, image_evidence)
                joined.append((shard, frame, inputs + more))
            shards = joined
    else:
        shards = [(int(p.stem.split("-", 1)[1]), read_table(p, "detections"), [p])
                  for p in source_shards(layout, dataset, det, scales)]
    for _, frame, _ in shards:
        for col in ("image_id", "detector"):
            frame[col] = frame[col].astype(str)
    return shards


def load_feature_rows(layout: Layout, kind: RankerKind, settings: Any, datasets: list[str], detectors: list[str],
                      scales: str, chosen: Mapping[str, set[str]]) -> tuple[pd.DataFrame, list[Path], list[tuple[str, str]]]:
    """Feature rows (with ``oracle_iou``, and the image's ``width`` and ``height``) of the chosen
    images of every dataset x detector, one image's boxes of one detector / scale / flip
    consecutive (``_group``), the files read, and
    the (dataset, image id) of every image whose rows are in the result."""
    frames, inputs = [], []
    for dataset in datasets:
        table, _ = load_images_table(layout, dataset)
        width = dict(zip(table["image_id"], table["width"]))
        height = dict(zip(table["image_id"], table["height"]))
        for det in detectors:
            for _, frame, read in ranker_shards(layout, kind, settings, dataset, det, scales):
                if "oracle_iou" not in frame.columns:
                    raise MissingInputError(
                        f"{read[0]}: boxes without oracle_iou; run `confrank oracle --dataset {dataset} "
                        f"--detector {det} --scales {scales}` first")
                frame = frame[frame["image_id"].isin(chosen[dataset])]
                frames.append(frame.assign(dataset=dataset, detector=det, width=frame["image_id"].map(width),
                                           height=frame["image_id"].map(height)))
                inputs.extend(read)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rows.empty:
        raise ConfrankError(f"no training boxes in {datasets} x {detectors} at scales {scales}")
    key = rows[["dataset", "detector", "image_id", "scale", "flip"]].astype(str).agg("\t".join, axis=1)
    rows["_group"] = pd.factorize(key)[0]
    rows = rows.sort_values("_group", kind="stable").reset_index(drop=True)
    trained = sorted(set(zip(rows["dataset"], rows["image_id"])))
    return rows, inputs, trained


def training_data(layout: Layout, kind: RankerKind, settings: Any, datasets: list[str], detectors: list[str],
                  scales: str, chosen: Mapping[str, set[str]]) -> tuple[Any, list[Path], list[tuple[str, str]]]:
    """(what ``kind``'s ``fit`` takes, files read, (dataset, image id) of every image trained on)."""
    if kind.reads == "boxes":
        return load_box_data(layout, datasets, detectors, scales, chosen)
    return load_feature_rows(layout, kind, settings, datasets, detectors, scales, chosen)


def score_context(layout: Layout, dataset: str, device: Any = None, batch_size: int = 8) -> tuple[ScoreContext, Path]:
    """The :class:`ScoreContext` of a dataset's images (sizes, reader), and the images table's path."""
    table, path = load_images_table(layout, dataset)
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in table.itertuples(index=False)}
    paths = {r.image_id: (r.abspath, int(r.width), int(r.height)) for r in table.itertuples(index=False)}
    return ScoreContext(sizes, ImageReader(paths), device, batch_size), path


def scored_frame(frame: pd.DataFrame, rank_score: np.ndarray) -> pd.DataFrame:
    """A re-ranked shard's table: the detection columns of ``frame`` plus ``rank_score`` (float32)."""
    out = frame[[c for c in frame.columns if c in DETECTION_COLUMNS or c.startswith("lm_")]].copy()
    out["rank_score"] = np.asarray(rank_score, np.float32)
    return out


def trained_images_text(trained: Iterable[tuple[str, str]]) -> str:
    """``train_images.txt``: one ``DATASET<TAB>IMAGE_ID`` line per image whose rows were trained on."""
    return "".join(f"{d}\t{i}\n" for d, i in sorted(set(trained)))


def train(layout: Layout, ranker: str, datasets: list[str], detectors: list[str], scales: str, values: dict[str, Any],
          *, chosen: dict[str, set[str]], out: Path | None = None, device: str = "auto", workers: int = 0,
          checkpoint_every: int = 1000, stop_after: int | None = None, record: dict[str, Any] | None = None) -> Fitted:
    """Train ranker ``ranker`` (option ``values``) on the ``chosen`` images of ``datasets`` x
    ``detectors`` and, once done, write its folder (``out``, default ``Layout.ranker_dir``).
    ``record`` adds to the run's identity (preset, id selection) in the checkpoint and provenance."""
    kind, settings = settings_of(values)
    impl = kind.impl()
    data, inputs, trained = training_data(layout, kind, settings, datasets, detectors, scales, chosen)
    out = out or layout.ranker_dir(ranker)
    run_config = {"ranker": ranker, "model": kind.name, "datasets": datasets, "detectors": detectors,
                  "scales": scales, "settings": settings.to_dict(), "chosen_ids": {k: sorted(v) for k, v in sorted(chosen.items())},
                  **(record or {})}
    evidence_record = image_evidence_of(inputs)
    if evidence_record is not None:
        run_config["image_evidence"] = evidence_record
    run = FitRun(out, run_config, str(pick_device(device)), workers, checkpoint_every, stop_after,
                 values.get("log_every") or 10)
    write_text_atomic(out / "train_images.txt", trained_images_text(trained))
    fitted = impl.fit(data, settings, run)
    if not fitted.done:
        return fitted
    meta = provenance("train", {k: v for k, v in run_config.items() if k != "chosen_ids"}, inputs=inputs)
    write_table(fitted.log, out / "train_log.parquet", "train_log", meta)
    _plot(fitted, out / "loss.png", f"{ranker}: {impl.describe(settings)}")
    extra = {"run_config": run_config, "code_version": meta["code_version"], **fitted.summary}
    from pipeline.ranker.network import save_torch

    save_torch(impl.payload(fitted.model, settings, extra), out / "model.pt")
    return fitted


def _plot(fitted: Fitted, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from pipeline.report import loss_figure

    fig = loss_figure({title: fitted.log})
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
