"""``confrank oracle``: add ``oracle_iou`` and ``gt_id`` to every detection, shard by shard.

Reads ``Layout.detections_dir`` shards and the ``gt`` table, writes ``Layout.oracle`` shards
with the same rows plus ``oracle_iou`` (IoU, +1 convention, with the closest face of the
image; 0 when none) and ``gt_id`` (that face, -1 when none). One dask task per shard (no
shuffle: a shard never splits an image).
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pipeline.boxes import annotate_oracle
from pipeline.provenance import provenance
from pipeline.tables import BOX_COLUMNS, read_metadata, read_table, write_table
from stages.common import DETECTION_SORT, dask_scheduler_option, map_shards, read_gt, require_shards, scales_option
from stages.layout import Layout, data_dir_option

#: the gt columns the annotation reads
GT_COLUMNS = ["image_id", "gt_id", *BOX_COLUMNS]


def _oracle_shard(job: tuple[Path, Path, Path, dict]) -> str:
    src, gt_path, dst, config = job
    torch.set_num_threads(1)
    dets = read_table(src, "detections")
    gt = read_table(gt_path, "gt", GT_COLUMNS)
    gt["image_id"] = gt["image_id"].astype(str)
    out = annotate_oracle(dets, gt)
    meta = provenance("oracle", config, inputs=[src, gt_path], detections=read_metadata(src))
    write_table(out, dst, "detections", metadata=meta, sort_by=DETECTION_SORT)
    return str(dst)


@click.command("oracle")
@click.option("--dataset", required=True, help="Dataset name (as given to `confrank index --name`).")
@click.option("--detector", required=True, help="Detector whose shards to annotate.")
@scales_option(help="Scale set of the detection shards.")
@dask_scheduler_option
@data_dir_option
def cli(dataset: str, detector: str, scales: str, dask_scheduler: str, data_dir: Path) -> None:
    """Annotate detections with oracle confidence (IoU with the closest face) and its gt_id."""
    layout = Layout(data_dir)
    sources = require_shards(layout.detections_dir(dataset, detector, scales), "detection",
                             f"run `confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")
    gt_path, _ = read_gt(layout, dataset)
    config = {"dataset": dataset, "detector": detector, "scales": scales, "iou": "+1 pixel convention"}
    jobs = [(src, gt_path, layout.oracle(dataset, detector, scales, int(src.stem.split("-")[1])), config) for src in sources]
    written = map_shards(_oracle_shard, jobs, dask_scheduler)
    click.echo(f"wrote {len(written)} oracle shards to {layout.oracle_dir(dataset, detector, scales)}")
