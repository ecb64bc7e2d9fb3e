"""``confrank oracle``: add ``oracle_iou`` and ``gt_id`` to every detection, shard by shard.

Reads ``Layout.detections_dir`` shards and the ``gt`` table, writes ``Layout.oracle`` shards
with the same rows plus ``oracle_iou`` (IoU, +1 convention, with the closest face of the
image; 0 when none) and ``gt_id`` (that face, -1 when none). One dask task per shard (no
shuffle: a shard never splits an image).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from pipeline.boxes import oracle_iou
from pipeline.provenance import provenance
from pipeline.tables import BOX_COLUMNS, read_metadata, read_table, write_table
from stages.common import DETECTION_SORT, dask_scheduler_option, map_shards, read_gt, require_shards, scales_option
from stages.layout import Layout, data_dir_option

GT_COLUMNS = ["image_id", "gt_id", *BOX_COLUMNS]


def annotate(dets: pd.DataFrame, gt: pd.DataFrame) -> pd.DataFrame:
    """``dets`` with ``oracle_iou`` (float32) and ``gt_id`` (int32) columns (replacing old ones)."""
    dets = dets.drop(columns=[c for c in ("oracle_iou", "gt_id") if c in dets])
    image_ids = dets["image_id"].astype(str)
    gt = gt[gt["image_id"].isin(set(image_ids))]
    codes, uniques = pd.factorize(pd.concat([image_ids, gt["image_id"]], ignore_index=True), sort=True)
    det_codes, gt_codes = codes[: len(dets)], codes[len(dets):]
    order = np.lexsort((gt["gt_id"].to_numpy(), gt_codes))
    gt_boxes = torch.from_numpy(gt[list(BOX_COLUMNS)].to_numpy(np.float64, copy=True)[order])
    iou, row = oracle_iou(
        torch.from_numpy(dets[list(BOX_COLUMNS)].to_numpy(np.float64, copy=True)), torch.from_numpy(det_codes.astype(np.int64)),
        gt_boxes, torch.from_numpy(gt_codes[order].astype(np.int64)),
    )
    row = row.numpy()
    gt_ids = gt["gt_id"].to_numpy()[order]
    out = dets.copy()
    out["oracle_iou"] = iou.numpy().astype(np.float32)
    out["gt_id"] = np.where(row >= 0, gt_ids[np.maximum(row, 0)] if len(gt_ids) else -1, -1).astype(np.int32)
    return out


def _oracle_shard(job: tuple[Path, Path, Path, dict]) -> str:
    src, gt_path, dst, config = job
    torch.set_num_threads(1)
    dets = read_table(src, "detections")
    gt = read_table(gt_path, "gt", GT_COLUMNS)
    gt["image_id"] = gt["image_id"].astype(str)
    out = annotate(dets, gt)
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
