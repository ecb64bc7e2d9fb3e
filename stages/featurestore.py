"""The feature cache shared by the stages that use per-box features.

``confrank features`` writes ``Layout.features`` shards; ``nms --method ensemble``,
``train --model gbm``, ``rerank`` (feature rankers) and ``cv`` read them through
:func:`feature_shards`, which computes the features on the fly instead when a cached shard is
missing, was made from another version of its source shard, or with another evidence set.

Evidence is compared view by view: each (image, scale, flip) group of a detector's boxes is
compared with the other detectors' boxes of the same image and the same view (``scale``,
``flip``; :func:`pipeline.ranker.features.frame_features`). At a single-view scale set
(``original``, ``8k``) that is every box of the image, as it always was, and the provenance
config is unchanged, so cached shards stay valid. At a multi-view set (``wider-multi``,
``8k-multi``) the config records ``evidence_view: same``: shards written when every view
was compared with all views lack it and are recomputed instead of served.

Kept apart from ``stages.common`` so that the stages that never touch features (detect,
oracle, evaluate, ...) do not depend on the feature code (their code hash would change with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pandas as pd

import pipeline.ranker.features  # noqa: F401  (declares the ``features`` table)
from pipeline.errors import ConfrankError, MissingInputError
from pipeline.tables import read_table, shard_paths
from stages.common import DETECTION_SORT, require_shards
from stages.layout import Layout


def evidence_option(func):
    """``--evidence DET,DET``: the detectors whose boxes are evidence for each other."""
    return click.option(
        "--evidence", required=True,
        help="Comma-separated detectors whose boxes are evidence for each other's (a box's own "
             "detector is left out); every one needs detections of the same dataset and scales.",
    )(func)


def source_shards(layout: Layout, dataset: str, detector: str, scales: str) -> list[Path]:
    """The box shards of one detector that the per-box stages read: its oracle shards when they
    exist, else its detections shards; MissingInputError naming ``confrank detect`` when neither."""
    parts = shard_paths(layout.oracle_dir(dataset, detector, scales))
    if parts:
        return parts
    return require_shards(layout.detections_dir(dataset, detector, scales), "detection",
                          f"run `confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")


#: the columns of the other detectors' boxes that the features read: ``scale`` and ``flip``
#: make each view's evidence the same view's boxes
EVIDENCE_COLUMNS = ["image_id", "scale", "flip", "x1", "y1", "x2", "y2", "score"]
#: how a group's evidence is chosen at a multi-view scale set (the provenance's ``evidence_view``)
EVIDENCE_VIEW = "same"


def _evidence_frames(layout: Layout, dataset: str, detector: str, scales: str, evidence: Sequence[str]) -> tuple[dict, list[Path]]:
    """The evidence detectors' boxes (:data:`EVIDENCE_COLUMNS`) by name, and the files read."""
    from pipeline.tables import read_tables

    frames, inputs = {}, []
    for other in sorted(set(evidence) - {detector}):
        parts = source_shards(layout, dataset, other, scales)
        frames[other] = read_tables(parts, "detections", columns=EVIDENCE_COLUMNS)
        inputs.extend(parts)
    return frames, inputs


def image_sizes(layout: Layout, dataset: str) -> tuple[dict[str, tuple[int, int]], Path]:
    """``{image_id: (width, height)}`` of a dataset's images table, and the table's path."""
    path = layout.images(dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: no images table for dataset {dataset!r}; run `confrank index --name {dataset} ...`")
    table = read_table(path, "images", ["image_id", "width", "height"])
    return {str(r.image_id): (int(r.width), int(r.height)) for r in table.itertuples(index=False)}, path


def _features_config(dataset: str, detector: str, scales: str, evidence: Sequence[str] | None) -> dict[str, Any]:
    """The features' provenance config; ``evidence=None`` (any evidence set will do: the reader
    does not use the evidence columns) matches a cached shard of any evidence set.

    A multi-view scale set adds ``evidence_view`` (:data:`EVIDENCE_VIEW`); a single-view set
    has one view, whose evidence was always the same boxes, so its config stays as it was."""
    from pipeline.ranker.features import FEATURES
    from pipeline.scales import scale_set

    config = {"dataset": dataset, "detector": detector, "scales": scales,
              "evidence": None if evidence is None else sorted(set(evidence) - {detector}), "features": list(FEATURES)}
    if scale_set(scales).multi:
        config["evidence_view"] = EVIDENCE_VIEW
    return config


def _shard_index(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def compute_features(layout: Layout, dataset: str, detector: str, scales: str,
                     evidence: Sequence[str]) -> list[tuple[int, pd.DataFrame, list[Path]]]:
    """Per shard of ``detector``: (shard index, features frame, inputs read), computed now."""
    from pipeline.ranker.features import frame_features

    parts = source_shards(layout, dataset, detector, scales)
    sizes, images_path = image_sizes(layout, dataset)
    others, other_inputs = _evidence_frames(layout, dataset, detector, scales, evidence)
    out = []
    for part in parts:
        dets = read_table(part, "detections")
        ids = set(dets["image_id"].astype(str))
        unknown = sorted(ids - set(sizes))
        if unknown:
            raise ConfrankError(f"{part}: image {unknown[0]!r} is not in the images table {images_path}")
        evidence_rows = {k: f[f["image_id"].astype(str).isin(ids)] for k, f in others.items()}
        frame = frame_features(dets, evidence_rows, sizes)
        out.append((_shard_index(part), frame, [part, images_path, *other_inputs]))
    return out


def write_features(layout: Layout, dataset: str, detector: str, scales: str, evidence: Sequence[str]) -> list[Path]:
    """Compute and write the features shards of one detector; returns the written paths."""
    from pipeline.provenance import provenance
    from pipeline.tables import write_table

    config = _features_config(dataset, detector, scales, evidence)
    written = []
    for shard, frame, inputs in compute_features(layout, dataset, detector, scales, evidence):
        dest = layout.features(dataset, detector, scales, shard)
        write_table(frame, dest, "features", provenance("features", config, inputs=inputs), sort_by=DETECTION_SORT)
        written.append(dest)
    return written


def _cache_valid(cached: Path, source: Path, config: dict[str, Any]) -> bool:
    """Whether a features shard was made from ``source`` as it is now, with ``config``'s
    evidence set, evidence views (``evidence_view``: absent at single-view sets) and feature
    list."""
    from pipeline.provenance import sha256_file
    from pipeline.tables import read_metadata

    if not cached.is_file():
        return False
    meta = read_metadata(cached)
    keys = ("features",) if config["evidence"] is None else ("evidence", "evidence_view", "features")
    same = all(meta.get("config", {}).get(k) == config.get(k) for k in keys)
    return same and sha256_file(source) in meta.get("inputs", {}).values()


def feature_shards(layout: Layout, dataset: str, detector: str, scales: str,
                   evidence: Sequence[str] | None) -> list[tuple[int, pd.DataFrame, list[Path]]]:
    """Features of every shard of one detector: (shard index, frame, files read) per shard.

    Cached shards (``confrank features``) are read when every one of them was made from its
    source shard as it is now, with the same evidence set (any set when ``evidence`` is None:
    a reader that ignores the evidence columns) and feature list; otherwise the features are
    computed on the fly (nothing is written; with no other detector's boxes when ``evidence``
    is None), with the same result. Frames hold the source shard's rows in the stored order
    (image, score descending).
    """
    from pipeline.tables import read_table as read

    sources = source_shards(layout, dataset, detector, scales)
    config = _features_config(dataset, detector, scales, evidence)
    cached = [layout.features(dataset, detector, scales, _shard_index(s)) for s in sources]
    if all(_cache_valid(c, s, config) for c, s in zip(cached, sources)):
        return [(_shard_index(c), read(c, "features"), [c]) for c in cached]
    return compute_features(layout, dataset, detector, scales, evidence or ())


def ensure_features(layout: Layout, dataset: str, detector: str, scales: str, evidence: Sequence[str]) -> None:
    """Write the features shards of one detector unless valid ones are there already."""
    sources = source_shards(layout, dataset, detector, scales)
    config = _features_config(dataset, detector, scales, evidence)
    cached = [layout.features(dataset, detector, scales, _shard_index(s)) for s in sources]
    if not all(_cache_valid(c, s, config) for c, s in zip(cached, sources)):
        write_features(layout, dataset, detector, scales, evidence)
