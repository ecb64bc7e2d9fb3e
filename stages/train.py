"""`confrank train`: train a confidence ranker of any kind (:mod:`pipeline.ranker.registry`).

Reads what the kind reads (``stages/rankerio.py``): the oracle shards
``DATA/interim/oracle/dataset=D/detector=DET/scales=SET/part-K.parquet`` and the images table
(``network``), or the per-box feature rows of ``confrank features`` (``gbm``; computed on the
fly when there are none, joined with ``confrank image-features`` when it reads the image group).
Writes ``DATA/processed/rankers/RNAME/``:

- ``model.pt``: the kind's payload (format tag, settings, weights or trees, provenance);
- ``train_log.parquet``: step, loss, lr, pair_accuracy, samples_per_s (``train_log`` schema);
- ``loss.png``: loss and pair accuracy against the step;
- ``checkpoint.pt`` (network): model, optimizer, AMP scaler, step, log and RNG states, written
  atomically every ``--checkpoint-every`` steps; a rerun with the same arguments resumes
  from it (and, when it is complete, only rewrites the outputs);
- ``train_images.txt``: ``DATASET<TAB>IMAGE_ID`` of every image whose rows were trained on.

``--preset NAME`` fills every ranker option from ``config/presets/NAME.yaml``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from pipeline.ranker.data import HALVES
from stages.common import parse_names, scales_option
from stages.layout import Layout, data_dir_option
from stages.ranker_options import ranker_options, ranker_values
from stages.rankerio import chosen_images, read_id_file, train


@click.command("train")
@click.option("--datasets", required=True, help="Comma-separated dataset names (indexed, with oracle shards).")
@click.option("--detectors", required=True, help="Comma-separated detectors whose boxes the ranker trains on.")
@scales_option()
@click.option("--ranker", required=True, help="Name of the ranker (output folder).")
@ranker_options
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--images", "id_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Train only on the image ids listed in this file (one per line).")
@click.option("--split-half", type=click.Choice(HALVES),
              help="Train on one deterministic half of each dataset's sorted image ids.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1), show_default=True,
              help="DataLoader worker processes (network), or LightGBM threads (gbm; 0 = all cores).")
@data_dir_option
def cli(datasets: str, detectors: str, scales: str, ranker: str, preset: str | None, checkpoint_every: int,
        id_file: Path | None, split_half: str | None, device: str, workers: int, data_dir: Path, **params) -> None:
    """Train the confidence ranker; rerunning a killed job resumes from its checkpoint."""
    layout = Layout.from_env(data_dir)
    names = parse_names(datasets)
    record = {"preset": preset, "split_half": split_half, "images_file_ids": read_id_file(id_file) if id_file else None}
    fitted = train(layout, ranker, names, parse_names(detectors), scales, ranker_values(params),
                   chosen=chosen_images(layout, names, split_half, id_file), device=device, workers=workers,
                   checkpoint_every=checkpoint_every, record=record)
    s = fitted.summary
    size = f"{params['model']}, {s['trees']} trees on {s['rows']} boxes in {s['seconds']:.1f} s" if "trees" in s else \
        f"{params['model']}, {s['steps']} steps, final loss {s.get('loss', math.nan):.4f}"
    click.echo(f"train {ranker}: {size}, pair accuracy {s.get('pair_accuracy', math.nan):.3f} -> {layout.ranker_dir(ranker)}")
