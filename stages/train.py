"""`confrank train`: train the confidence ranker on oracle-annotated detections.

Reads, for every dataset and detector given, the oracle shards
``DATA/interim/oracle/dataset=D/detector=DET/scales=SET/part-K.parquet`` and the images
table ``DATA/interim/index/D/images.parquet`` (image paths relative to the ``root`` stored
in its provenance, or absolute). Writes ``DATA/processed/rankers/RNAME/``:

- ``model.pt``: format tag, model config, fp32 weights, training config (read by rerank);
- ``train_log.parquet``: step, loss, lr, pair_accuracy, samples_per_s (``train_log`` schema);
- ``loss.png``: loss and pair accuracy against the step;
- ``checkpoint.pt``: model, optimizer, AMP scaler, step, log and RNG states, written
  atomically every ``--checkpoint-every`` steps; a rerun with the same arguments resumes
  from it (and, when it is complete, only rewrites the outputs);
- ``train_images.txt``: the image ids trained on (``DATASET<TAB>IMAGE_ID`` per line).

``--model gbm`` trains the feature ranker instead (``stages/rankers.py``): LightGBM on the
per-box features of ``confrank features`` shards (computed on the fly when there are none),
no checkpoint (it trains in minutes); ``--preset NAME`` fills every ranker option from
``config/presets/NAME.yaml``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from pipeline.ranker.data import HALVES
from stages.common import parse_names
from stages.layout import Layout, data_dir_option
from stages.rankers import ranker_options, ranker_settings, train_gbm_ranker, train_ranker


@click.command("train")
@click.option("--datasets", required=True, help="Comma-separated dataset names (indexed, with oracle shards).")
@click.option("--detectors", required=True, help="Comma-separated detectors; each sample draws one at random.")
@click.option("--scales", required=True, help="Scale set of the detections (original, 8k, wider-multi, 8k-multi).")
@click.option("--ranker", required=True, help="Name of the ranker (output folder).")
@ranker_options
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--images", "id_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Train only on the image ids listed in this file (one per line).")
@click.option("--split-half", type=click.Choice(HALVES),
              help="Train on one deterministic half of each dataset's sorted image ids.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1), show_default=True,
              help="DataLoader worker processes (network), or LightGBM threads (gbm; 0 = all cores).")
@data_dir_option
def cli(datasets: str, detectors: str, scales: str, ranker: str, preset: str | None, checkpoint_every: int,
        id_file: Path | None, split_half: str | None, device: str, workers: int, data_dir: Path, **options) -> None:
    """Train the confidence ranker; rerunning a killed job resumes from its checkpoint."""
    layout = Layout.from_env(data_dir)
    kind, model_cfg, train_cfg = ranker_settings(options)
    if kind == "gbm":
        summary = train_gbm_ranker(layout, ranker, parse_names(datasets), parse_names(detectors), scales, model_cfg,
                                   half=split_half, id_file=id_file, threads=workers,
                                   log_every=options["log_every"], preset=preset)
        click.echo(f"train {ranker}: gbm, {model_cfg.trees} trees on {summary['rows']} boxes in "
                   f"{summary['seconds']:.1f} s, pair accuracy {summary['pair_accuracy']:.3f} -> {layout.ranker_dir(ranker)}")
        return
    trainer = train_ranker(layout, ranker, parse_names(datasets), parse_names(detectors), scales, model_cfg, train_cfg,
                           half=split_half, id_file=id_file, checkpoint_every=checkpoint_every, device=device,
                           workers=workers, pretrained=options["pretrained"])
    last = trainer.log[-1] if trainer.log else {}
    acc = last.get("pair_accuracy", math.nan)
    click.echo(f"train {ranker}: {trainer.step} steps, final loss {last.get('loss', math.nan):.4f}, "
               f"pair accuracy {acc:.3f} -> {layout.ranker_dir(ranker)}")
