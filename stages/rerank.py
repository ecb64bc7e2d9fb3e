"""`confrank rerank`: add a trained ranker's ``rank_score`` to every shard of one detector.

Reads the rows the ranker's kind reads (``stages/rankerio.py``): the oracle shards of
(dataset, detector, scales), or the plain detections shards when there are none (``network``),
or the per-box features of that detector (``gbm``; cached ``confrank features`` shards or
computed on the fly, with the other detectors of the ranker's evidence set, and the
``confrank image-features`` columns when it reads them). A ranker without an evidence set
needs only this detector's detections. Writes
``DATA/interim/reranked/ranker=R/dataset=D/detector=DET/scales=SET/part-K.parquet``: the
detection columns of the same rows in the same order plus ``rank_score`` (float32).

A network ranks each (image, scale, flip) group of boxes separately: its boxes sorted by
detector score, the first N (the model's ``num_boxes``) re-scored, the rest keeping their
detector score; groups are batched (``--batch-size``) under ``inference_mode``, on the GPU
(with autocast) when present.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.provenance import provenance, sha256_file
from pipeline.ranker.registry import load_ranker
from pipeline.tables import write_table
from stages.common import pick_device, scales_option
from stages.layout import Layout, data_dir_option
from stages.rankerio import ranker_shards, score_context, scored_frame


def run_rerank(layout: Layout, dataset: str, detector: str, scales: str, ranker: str,
               device: str = "auto", batch_size: int = 8) -> list[Path]:
    """Rerank every shard; returns the written paths."""
    model_path = layout.ranker_model(ranker)
    loaded = load_ranker(model_path, pick_device(device))
    context, table_path = score_context(layout, dataset, pick_device(device), batch_size)
    record = {"dataset": dataset, "detector": detector, "scales": scales, "ranker": ranker,
              "source": loaded.kind.reads, "model_config": loaded.to_dict()}
    written = []
    shards = ranker_shards(layout, loaded.kind, loaded.settings, dataset, detector, scales, loaded.image_evidence)
    for shard, frame, inputs in shards:
        out = scored_frame(frame, loaded.score(frame, context))
        meta = provenance("rerank", record, inputs=[*inputs, model_path, table_path],
                          ranker_sha256=sha256_file(model_path))
        dest = layout.reranked(ranker, dataset, detector, scales, shard)
        write_table(out, dest, "detections", meta)
        written.append(dest)
    return written


@click.command("rerank")
@click.option("--dataset", required=True)
@click.option("--detector", required=True)
@scales_option()
@click.option("--ranker", required=True, help="Name of a ranker trained with `confrank train`.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Box groups (image x scale x flip) per forward pass (network rankers).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@data_dir_option
def cli(dataset: str, detector: str, scales: str, ranker: str, batch_size: int, device: str, data_dir: Path) -> None:
    """Add rank_score to the (oracle) detections shards with a trained ranker."""
    layout = Layout.from_env(data_dir)
    t0 = time.perf_counter()
    written = run_rerank(layout, dataset, detector, scales, ranker, device, batch_size)
    click.echo(f"rerank {dataset}/{detector}/{scales} with {ranker}: {len(written)} shard(s) in "
               f"{time.perf_counter() - t0:.1f} s -> {layout.reranked_dir(ranker, dataset, detector, scales)}")
