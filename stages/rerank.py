"""`confrank rerank`: add the trained ranker's ``rank_score`` to every detections shard.

Reads the oracle shards of (dataset, detector, scales) — or the plain detections shards
when there are none — and writes
``DATA/interim/reranked/ranker=R/dataset=D/detector=DET/scales=SET/part-K.parquet``: the
same rows in the same order plus ``rank_score`` (float32).

Each (image, scale, flip) group of boxes is ranked separately: its boxes sorted by detector
score, the first N (the model's ``num_boxes``, 5000 by default) re-scored by the ranker;
boxes beyond the first N keep their detector score as ``rank_score``. Groups are batched
(``--batch-size``) and run under ``inference_mode``, on the GPU (with autocast) when present.

A feature ranker (``train --model gbm``) re-scores every box from its per-box features
(``confrank features`` shards of this detector, computed on the fly when absent or made
with another evidence set); the other detectors of its evidence set need detections of the
same dataset and scale set.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from pipeline.ranker.gbm import GbmConfig
from pipeline.provenance import provenance, sha256_file
from pipeline.tables import read_table, shard_paths, write_table
from pipeline.errors import MissingInputError
from stages.featurestore import feature_shards
from stages.layout import Layout, data_dir_option
from stages.common import pick_device
from stages.rankers import gbm_rank_frame, load_images_table, load_ranker, read_rgb, rerank_frame


def run_rerank(layout: Layout, dataset: str, detector: str, scales: str, ranker: str,
               device: str = "auto", batch_size: int = 8) -> list[Path]:
    """Rerank every shard; returns the written paths."""
    dev = pick_device(device)
    model_path = layout.ranker_model(ranker)
    model, config = load_ranker(model_path, dev)
    if isinstance(config, GbmConfig):
        return _rerank_gbm(layout, dataset, detector, scales, ranker, model, config)
    parts = shard_paths(layout.oracle_dir(dataset, detector, scales))
    source = "oracle"
    if not parts:
        parts = shard_paths(layout.detections_dir(dataset, detector, scales))
        source = "detections"
    if not parts:
        raise MissingInputError(
            f"{layout.detections_dir(dataset, detector, scales)}: no detections shards; run "
            f"`confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")
    table, table_path = load_images_table(layout, dataset)
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in table.itertuples(index=False)}
    paths = {r.image_id: (r.abspath, int(r.width), int(r.height)) for r in table.itertuples(index=False)}

    def load_image(image_id: str) -> np.ndarray:
        return read_rgb(*paths[image_id])

    written = []
    config_record = {"dataset": dataset, "detector": detector, "scales": scales, "ranker": ranker,
                     "source": source, "model_config": config.to_dict()}
    for part in parts:
        df = read_table(part, "detections")
        for col in ("image_id", "detector"):
            df[col] = df[col].astype(str)
        out = rerank_frame(df, model, config, sizes, load_image, dev, batch_size)
        shard = int(part.stem.split("-", 1)[1])
        dest = layout.reranked(ranker, dataset, detector, scales, shard)
        meta = provenance("rerank", config_record, inputs=[part, model_path, table_path],
                          ranker_sha256=sha256_file(model_path))
        write_table(out, dest, "detections", meta)
        written.append(dest)
    return written


def _rerank_gbm(layout: Layout, dataset: str, detector: str, scales: str, ranker: str, booster,
                config: GbmConfig) -> list[Path]:
    model_path = layout.ranker_model(ranker)
    written = []
    for shard, frame, inputs in feature_shards(layout, dataset, detector, scales, config.evidence):
        out = gbm_rank_frame(frame, booster, config)
        record = {"dataset": dataset, "detector": detector, "scales": scales, "ranker": ranker,
                  "source": "features", "model_config": config.to_dict()}
        meta = provenance("rerank", record, inputs=[*inputs, model_path], ranker_sha256=sha256_file(model_path))
        dest = layout.reranked(ranker, dataset, detector, scales, shard)
        write_table(out, dest, "detections", meta)
        written.append(dest)
    return written


@click.command("rerank")
@click.option("--dataset", required=True)
@click.option("--detector", required=True)
@click.option("--scales", required=True, help="Scale set of the detections.")
@click.option("--ranker", required=True, help="Name of a ranker trained with `confrank train`.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Box groups (image x scale x flip) per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@data_dir_option
def cli(dataset: str, detector: str, scales: str, ranker: str, batch_size: int, device: str, data_dir: Path) -> None:
    """Add rank_score to the (oracle) detections shards with a trained ranker."""
    layout = Layout.from_env(data_dir)
    t0 = time.perf_counter()
    written = run_rerank(layout, dataset, detector, scales, ranker, device, batch_size)
    click.echo(f"rerank {dataset}/{detector}/{scales} with {ranker}: {len(written)} shard(s) in "
               f"{time.perf_counter() - t0:.1f} s -> {layout.reranked_dir(ranker, dataset, detector, scales)}")
