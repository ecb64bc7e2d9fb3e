"""``confrank fuse``: several detectors' boxes of one dataset fused into one set of final boxes.

Method ``wbf``: Weighted Boxes Fusion (``pipeline.fusion.weighted_boxes_fusion``, the
``ensemble-boxes`` package): NMS per detector and image, then WBF per image of every
detector's boxes, the best ``keep`` per image.

Method ``rank-RNAME`` (``--method rank --ranker RNAME``): the learned fusion of a ``fusion``
ranker (``confrank train --preset fuse``; :mod:`pipeline.ranker.fusion`): it reads every
detector's per-box features (``confrank features`` shards with the ranker's evidence set,
computed on the fly when absent), clusters the boxes and scores the clusters. ``--detectors``
must be the detectors the ranker fuses (its evidence set).

Reads each detector's oracle shards (``Layout.oracle_dir``; the same boxes as its detection
shards) when they cover the same shard files as its detection shards, else its detection shards
(``Layout.detections_dir``), and the images table (image sizes). An image one detector has no
boxes for is an image where it found nothing. The shards are processed in groups that never
split an image between groups (with the usual sharding, shard K of every detector is one
group), one dask task each, so memory is bounded by a group. Writes
``Layout.final(dataset, NAME, scales, method)``: a ``final`` table sorted by image and score,
with the method, the detectors and every setting in its metadata; ``confrank evaluate
--detector NAME --method wbf`` scores it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import pandas as pd
import torch

from pipeline.errors import ConfrankError
from pipeline.fusion import CONF_TYPES, FUSIONS
from pipeline.methods import Method
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, read_tables, shard_paths, write_table
from stages.common import (DETECTION_SORT, dask_scheduler_option, map_shards, method_name, parse_names, require_shards,
                           scales_option)
from stages.featurestore import image_sizes
from stages.layout import Layout, data_dir_option

#: a fusion's name is a folder name under processed/final/{dataset}/
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
BOX_READ = ["image_id", "x1", "y1", "x2", "y2", "score"]


def box_shards(layout: Layout, dataset: str, detector: str, scales: str) -> list[Path]:
    """One detector's shards: its oracle shards when they are the same files as its detection
    shards (or there are no detection shards), else its detection shards; MissingInputError
    naming the ``confrank detect`` command when it has neither."""
    detections = shard_paths(layout.detections_dir(dataset, detector, scales))
    oracle = shard_paths(layout.oracle_dir(dataset, detector, scales))
    if oracle and (not detections or [p.name for p in oracle] == [p.name for p in detections]):
        return oracle
    return require_shards(layout.detections_dir(dataset, detector, scales), "detection",
                          f"run `confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")


def shard_groups(parts: Sequence[Sequence[Path]]) -> list[list[list[Path]]]:
    """The shards of several detectors (``parts[d]``) in groups that never split an image: two
    shards are in one group when they share an image (union-find on their ``image_id``s).
    Returns per group, per detector, its shards (possibly none)."""
    nodes = [(d, p) for d, paths in enumerate(parts) for p in paths]
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, (_, path) in enumerate(nodes):
        for image in read_table(path, "detections", ["image_id"])["image_id"].astype(str).unique():
            j = owner.setdefault(image, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[list[Path]]] = {}
    for i, (d, path) in enumerate(nodes):
        groups.setdefault(root(i), [[] for _ in parts])[d].append(path)
    return [groups[k] for k in sorted(groups)]


def _fuse_group(job: tuple[str, list[list[Path]], list[str], dict[str, tuple[int, int]], dict[str, Any]]) -> pd.DataFrame:
    method, group, detectors, sizes, settings = job
    torch.set_num_threads(1)
    frames = [read_tables(paths, "detections", BOX_READ) for paths in group]
    for detector, frame, paths in zip(detectors, frames, group):
        unknown = sorted(set(frame["image_id"].astype(str)) - set(sizes))
        if unknown:
            raise ConfrankError(f"{paths[0]}: detector {detector!r} has boxes of {len(unknown)} image(s) not in the "
                                f"dataset's images table, e.g. {unknown[0]!r}; re-run `confrank detect` for this dataset")
    ids = set().union(*(set(f["image_id"].astype(str)) for f in frames))
    return FUSIONS[method](frames, {i: sizes[i] for i in ids}, **settings)


#: settings of each method as recorded and passed to its function, from the command's options
def _wbf_settings(iou: float, keep: int, wbf_iou: float, skip_box_thr: float, conf_type: str) -> dict[str, Any]:
    return {"nms_iou": iou, "iou_thr": wbf_iou, "skip_box_thr": skip_box_thr, "conf_type": conf_type, "keep": keep}


SETTINGS = {"wbf": _wbf_settings}
#: the package behind each method, recorded with its version
PACKAGES = {"wbf": "ensemble-boxes"}


@click.command("fuse")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--detectors", required=True, help="Comma-separated detectors whose boxes are fused (each needs shards of --scales).")
@scales_option(help="Scale set of the shards.")
@click.option("--method", required=True,
              help="wbf: Weighted Boxes Fusion (ensemble-boxes) after NMS per detector; rank (with --ranker) or "
                   "rank-RNAME: the learned fusion of a fusion ranker.")
@click.option("--ranker", default=None, help="A fusion ranker (for --method rank).")
@click.option("--name", required=True, help="Name of the fused result: the detector name under which it is stored and evaluated.")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.4, show_default=True, help="IoU of the NMS run per detector and image first (suppress above).")
@click.option("--keep", type=click.IntRange(min=1), default=750, show_default=True, help="Fused boxes kept per image.")
@click.option("--wbf-iou", type=click.FloatRange(0, 1), default=0.55, show_default=True, help="WBF: IoU for a box to join a cluster (iou_thr).")
@click.option("--skip-box-thr", type=click.FloatRange(0, 1), default=0.02, show_default=True, help="WBF: boxes scored below this are ignored.")
@click.option("--conf-type", type=click.Choice(CONF_TYPES), default="avg", show_default=True, help="WBF: how a cluster's confidence is computed.")
@dask_scheduler_option
@data_dir_option
def cli(dataset: str, detectors: str, scales: str, method: str, ranker: str | None, name: str, iou: float, keep: int,
        wbf_iou: float, skip_box_thr: float, conf_type: str, dask_scheduler: str, data_dir: Path) -> None:
    """Fuse several detectors' boxes of one dataset into final boxes (WBF or a learned fusion)."""
    if not NAME_PATTERN.fullmatch(name):
        raise click.BadParameter(f"{name!r}: expected letters, digits and _.+- (not starting with one of _.+-)", param_hint="--name")
    layout = Layout(data_dir)
    stored = method_name(method, ranker)
    names = list(dict.fromkeys(parse_names(detectors)))
    parsed = Method.parse(stored)
    if parsed.kind == "rank":
        return _learned(layout, dataset, names, scales, parsed.ranker, name, keep, stored)
    if parsed.kind not in FUSIONS:
        raise click.BadParameter(f"{method!r}: expected wbf, rank (with --ranker) or rank-RNAME", param_hint="--method")
    parts = [box_shards(layout, dataset, d, scales) for d in names]  # every detector checked before any work
    sizes, images_path = image_sizes(layout, dataset)
    settings = SETTINGS[method](iou, keep, wbf_iou, skip_box_thr, conf_type)
    groups = shard_groups(parts)
    results = map_shards(_fuse_group, [(method, g, names, sizes, settings) for g in groups], dask_scheduler)
    final = pd.concat(results, ignore_index=True)
    config = {"dataset": dataset, "detector": name, "scales": scales, "method": stored, "detectors": names,
              "fusion": method, "score_column": "score", "iou_convention": "+1 pixel", **settings,
              "iou": iou, "package": f"{PACKAGES[method]}=={version(PACKAGES[method])}"}
    sources = [p for paths in parts for p in paths]
    meta = provenance("fuse", config, inputs=[*sources, images_path], source_metadata=read_metadata(sources[0]))
    path = layout.final(dataset, name, scales, stored)
    write_table(final, path, "final", metadata=meta, sort_by=DETECTION_SORT)
    click.echo(f"wrote {len(final)} boxes ({method} of {', '.join(names)}) to {path}")


def _learned(layout: Layout, dataset: str, names: list[str], scales: str, ranker: str, name: str, keep: int,
             stored: str) -> None:
    """``--method rank-RNAME``: the learned fusion of ranker ``ranker`` over ``names``."""
    from pipeline.provenance import sha256_file
    from pipeline.ranker.registry import load_ranker
    from stages.rankerio import ranker_shards

    model_path = layout.ranker_model(ranker)
    loaded = load_ranker(model_path)
    impl = loaded.kind.impl()
    if not loaded.kind.fuses:
        raise ConfrankError(f"{model_path}: ranker {ranker!r} is a {loaded.kind.name} ranker, which re-scores one "
                            "detector's boxes (`confrank rerank`); `confrank fuse` needs a fusion ranker "
                            "(`confrank train --preset fuse`)")
    if sorted(names) != sorted(loaded.settings.evidence_set):
        raise ConfrankError(f"ranker {ranker!r} fuses {', '.join(loaded.settings.evidence_set)}; --detectors gave "
                            f"{', '.join(names)}")
    for det in names:  # every detector checked before any work
        box_shards(layout, dataset, det, scales)
    sizes, images_path = image_sizes(layout, dataset)
    frames, inputs = [], []
    for det in names:
        shards = ranker_shards(layout, loaded.kind, loaded.settings, dataset, det, scales, loaded.image_evidence)
        frames.append(pd.concat([f for _, f, _ in shards], ignore_index=True))
        inputs += [p for _, _, read in shards for p in read]
    final = impl.fuse(loaded.model, loaded.settings, frames, sizes, keep)
    config = {"dataset": dataset, "detector": name, "scales": scales, "method": stored, "detectors": names,
              "fusion": "learned", "ranker": ranker, "score_column": "score", "keep": keep,
              "settings": loaded.to_dict()}
    meta = provenance("fuse", config, inputs=[*inputs, images_path, model_path], ranker_sha256=sha256_file(model_path))
    path = layout.final(dataset, name, scales, stored)
    write_table(final, path, "final", metadata=meta, sort_by=DETECTION_SORT)
    click.echo(f"wrote {len(final)} boxes (learned fusion {ranker} of {', '.join(names)}) to {path}")
