"""``confrank nms``: NMS or box voting of detection shards into final boxes.

Methods and their inputs:

* ``single``: greedy NMS of a one-scale set (oracle shards, else detection shards);
* ``multi``: box voting over the union of all scales and flips of an image (same inputs);
* ``oracle``: the score replaced by ``oracle_iou`` (oracle shards), then NMS for a
  one-scale set or voting for a multi-scale set: the upper bound of seed 000, Fig. 2;
* ``ensemble``: the score replaced by ``ensemble_score`` (``Layout.features`` shards: the
  mean of the box's score and the best score of another detector's box overlapping it at
  IoU >= 0.5), then NMS or voting as for ``oracle``;
* ``rank``: the score replaced by the ranker's ``rank_score`` (``Layout.reranked`` shards),
  then NMS or voting as for ``oracle``; written as method ``rank-{ranker}``.

Shards are processed one dask task each and only their (small) results are kept, so
memory is bounded by the largest shard. Output: ``Layout.final`` (``final`` table, sorted by
image and score), with the method, IoU, keep, fusion and singleton rule in its metadata.
"""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd
import torch

from pipeline.postprocess import SCORE_COLUMN, fuse, fusion_of
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, shard_paths, write_table
from stages.common import DETECTION_SORT, dask_scheduler_option, map_shards, method_name, require_shards, scales_option
from stages.layout import Layout, data_dir_option

def _fuse_shard(job: tuple[Path, str, float, int, bool]) -> tuple[pd.DataFrame, int]:
    path, method, iou, keep, keep_singletons = job
    torch.set_num_threads(1)
    if method == "ensemble":
        import pipeline.ranker.features  # noqa: F401  (declares the ``features`` table)
    dets = read_table(path, "features" if method == "ensemble" else "detections")
    n_views = len(dets[["scale", "flip"]].drop_duplicates())
    return fuse(dets, method, iou, keep, keep_singletons, source=str(path)), n_views


def input_shards(layout: Layout, dataset: str, detector: str, scales: str, method: str, ranker: str | None) -> list[Path]:
    """The shards a method reads (oracle shards, falling back to detections for single/multi)."""
    if method == "ensemble":
        return require_shards(layout.features_dir(dataset, detector, scales), "features",
                              f"run `confrank features --dataset {dataset} --detector {detector} --scales {scales} --evidence DET,DET` first")
    if method == "rank":
        return require_shards(layout.reranked_dir(ranker, dataset, detector, scales), "re-ranked",
                              f"run `confrank rerank --dataset {dataset} --detector {detector} --scales {scales} --ranker {ranker}` first")
    oracle = shard_paths(layout.oracle_dir(dataset, detector, scales))
    if oracle or method == "oracle":
        return oracle or require_shards(layout.oracle_dir(dataset, detector, scales), "oracle",
                                        f"run `confrank oracle --dataset {dataset} --detector {detector} --scales {scales}` first")
    return require_shards(layout.detections_dir(dataset, detector, scales), "detection",
                          f"run `confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")


@click.command("nms")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--detector", required=True, help="Detector name.")
@scales_option(help="Scale set of the shards.")
@click.option("--method", type=click.Choice(sorted(SCORE_COLUMN)), required=True, help="single: NMS; multi: box voting; oracle/rank/ensemble: oracle IoU, ranker score or the "
                   "training-free ensemble score (confrank features) as confidence.")
@click.option("--ranker", default=None, help="Ranker name (for --method rank).")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.4, show_default=True, help="IoU threshold of NMS (suppress above) and voting (cluster at or above).")
@click.option("--keep", type=click.IntRange(min=1), default=750, show_default=True, help="Boxes kept per image.")
@click.option("--keep-singletons/--drop-singletons", default=False, show_default=True,
              help="Voting: keep one-box clusters (default drops them, as the RetinaFace reference test code).")
@dask_scheduler_option
@data_dir_option
def cli(dataset: str, detector: str, scales: str, method: str, ranker: str | None, iou: float, keep: int,
        keep_singletons: bool, dask_scheduler: str, data_dir: Path) -> None:
    """NMS / box voting of (oracle-annotated or re-ranked) shards into final boxes."""
    layout = Layout(data_dir)
    name = method_name(method, ranker)
    sources = input_shards(layout, dataset, detector, scales, method, ranker)
    results = map_shards(_fuse_shard, [(p, method, iou, keep, keep_singletons) for p in sources], dask_scheduler)
    final = pd.concat([r[0] for r in results], ignore_index=True)
    n_views = max(r[1] for r in results)
    config = {"dataset": dataset, "detector": detector, "scales": scales, "method": name, "iou": iou, "keep": keep,
              "keep_singletons": keep_singletons, "fusion": fusion_of(method, multi=n_views > 1), "score_column": SCORE_COLUMN[method],
              "iou_convention": "+1 pixel"}
    meta = provenance("nms", config, inputs=sources, source_metadata=read_metadata(sources[0]))
    path = layout.final(dataset, detector, scales, name)
    write_table(final, path, "final", metadata=meta, sort_by=DETECTION_SORT)
    click.echo(f"wrote {len(final)} boxes ({config['fusion']}) to {path}")
