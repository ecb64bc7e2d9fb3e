"""``confrank features``: per-box features of one detector's boxes, cached as shards.

Reads the oracle shards of (dataset, detector, scales) (the detections shards when there
are none), every shard of each *other* evidence detector on the same dataset and scale set,
and the images table (for the image sizes). Writes
``Layout.features(dataset, detector, scales, k)``: the input shard's rows in the same order
plus the ``pipeline.ranker.features.FEATURES`` columns and ``ensemble_score`` (the
training-free baseline: mean of the box's score and the best overlapping score of another
detector). ``confrank nms --method ensemble`` fuses on ``ensemble_score``; the feature ranker
(``confrank train --model gbm``) trains on and re-scores with the feature columns.

The evidence set and every input's sha256 are recorded in the shards' metadata; train,
rerank, nms and cv use a cached shard only when it was made from the current source shard
with the same evidence set, and compute the same features on the fly otherwise
(``stages/featurestore.py``). Features depend only on boxes and scores: no image is decoded.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import parse_names, scales_option
from stages.featurestore import evidence_option, write_features
from stages.layout import Layout, data_dir_option


@click.command("features")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--detector", required=True, help="Detector whose boxes are described.")
@scales_option()
@evidence_option
@data_dir_option
def cli(dataset: str, detector: str, scales: str, evidence: str, data_dir: Path) -> None:
    """Per-box features and the ensemble score of one detector's shards."""
    layout = Layout.from_env(data_dir)
    written = write_features(layout, dataset, detector, scales, parse_names(evidence))
    click.echo(f"features {dataset}/{detector}/{scales}: {len(written)} shard(s) -> "
               f"{layout.features_dir(dataset, detector, scales)}")
