"""Seed 000's single-detector setting (config/presets/cpu-single.yaml): a feature ranker on one
detector's boxes and their image evidence, trained and then re-scoring in a data folder that
holds that one detector's shards and image features, nothing of any other detector."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.config import ranker_settings, read_preset
from pipeline.errors import ConfrankError, MissingInputError
from pipeline.provenance import provenance
from pipeline.ranker.image_evidence import IMAGE_FEATURES, KEY_COLUMNS
from pipeline.ranker.registry import load_ranker
from pipeline.tables import read_metadata, read_table, shard_paths, write_table
from stages import rerank as rerank_stage
from stages import train as train_stage
from stages.layout import Layout
from tests.test_ranker_stages import SORT, invoke, make_pool


#: what `confrank image-features` records by default (its --evidence-net and --max-side)
EVIDENCE = {"evidence_net": "retinaface-mnet025", "max_side": 1024}


def write_image_features(layout: Layout, dataset: str, detector: str, seed: int = 0, shards=None,
                         made_with: dict | None = None) -> None:
    """Synthetic image evidence aligned row by row with the detector's oracle shards: the first
    column tells faces from the rest better than the detector's score does, the others are noise.
    ``made_with``: the settings its provenance records (default :data:`EVIDENCE`)."""
    rng = np.random.default_rng(seed)
    for part in shard_paths(layout.oracle_dir(dataset, detector, "original")):
        if shards is not None and int(part.stem.split("-", 1)[1]) not in shards:
            continue
        dets = read_table(part, "detections")
        out = dets[list(KEY_COLUMNS)].copy()
        for j, name in enumerate(IMAGE_FEATURES):
            noise = rng.normal(0, 0.05 if j == 0 else 1, len(dets)).astype(np.float32)
            out[name] = (dets["oracle_iou"].to_numpy(np.float32) + noise) if j == 0 else noise
        shard = int(part.stem.split("-", 1)[1])
        write_table(out, layout.image_features(dataset, detector, "original", shard), "image_features",
                    provenance("image_features", made_with or EVIDENCE), sort_by=SORT)


@pytest.fixture
def pool(tmp_path):
    layout = Layout(tmp_path / "data")
    make_pool(layout, "toy", 10, seed=0)
    make_pool(layout, "toy2", 6, seed=1)
    for name, seed in (("toy", 0), ("toy2", 1)):
        write_image_features(layout, name, "detA", seed)
    return layout


TRAIN = ["--datasets", "toy2", "--detectors", "detA", "--scales", "original", "--ranker", "s", "--preset", "cpu-single",
         "--gbm-trees", "20", "--gbm-min-leaf", "5", "--workers", "1"]


def test_preset_is_one_detector_with_image_evidence():
    kind, settings = ranker_settings({"preset": "cpu-single"})
    assert kind.name == "gbm" and settings.features == ("own", "neighbours", "image")
    assert settings.image_features and settings.evidence_set == ()
    cpu = read_preset("cpu")
    single = read_preset("cpu-single")
    assert {k: v for k, v in single.items() if k not in ("evidence", "gbm_features")} == \
        {k: v for k, v in cpu.items() if k not in ("evidence", "gbm_features")}


def test_train_then_rerank_with_only_that_detector(pool, tmp_path):
    invoke(train_stage.cli, TRAIN, pool)
    # a data folder with detA's oracle shards, its image features and the images table: no detB, no features
    bare = Layout(tmp_path / "bare")
    for k in (0, 1):
        for src, dest in ((pool.oracle("toy", "detA", "original", k), bare.oracle("toy", "detA", "original", k)),
                          (pool.image_features("toy", "detA", "original", k),
                           bare.image_features("toy", "detA", "original", k))):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
    write_table(read_table(pool.images("toy"), "images"), bare.images("toy"), "images", read_metadata(pool.images("toy")))
    shutil.copytree(pool.ranker_dir("s"), bare.ranker_dir("s"))
    invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original", "--ranker", "s"], bare)
    ranked = pd.concat([read_table(bare.reranked("s", "toy", "detA", "original", k), "detections") for k in (0, 1)])
    assert not bare.features_dir("toy", "detA", "original").exists()
    # the image evidence made the new scores follow the oracle better than the detector's
    corr = np.corrcoef(ranked["rank_score"], ranked["oracle_iou"])[0, 1]
    assert corr > np.corrcoef(ranked["score"], ranked["oracle_iou"])[0, 1] + 0.1


def test_rerank_without_image_features_names_the_stage(pool):
    invoke(train_stage.cli, TRAIN, pool)
    shutil.rmtree(pool.image_features_dir("toy", "detA", "original"))
    with pytest.raises(MissingInputError, match="confrank image-features --dataset toy --detector detA"):
        CliRunner().invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original",
                                              "--ranker", "s", "--data-dir", str(pool.root)], catch_exceptions=False)


def test_ranker_records_its_image_evidence_and_refuses_other(pool):
    invoke(train_stage.cli, TRAIN, pool)
    assert load_ranker(pool.ranker_model("s")).image_evidence == EVIDENCE
    # the held-out dataset's evidence made at a lower resolution: other numbers in the same columns
    write_image_features(pool, "toy", "detA", made_with={**EVIDENCE, "max_side": 512})
    with pytest.raises(ConfrankError, match=r"max_side': 512.*--evidence-net retinaface-mnet025 --max-side 1024"):
        CliRunner().invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original",
                                              "--ranker", "s", "--data-dir", str(pool.root)], catch_exceptions=False)
    assert not pool.reranked_dir("s", "toy", "detA", "original").exists()


def test_training_on_two_kinds_of_image_evidence_fails(pool):
    write_image_features(pool, "toy2", "detA", seed=1, shards={1}, made_with={**EVIDENCE, "evidence_net": "retinaface-r50"})
    with pytest.raises(ConfrankError, match="image evidence made with different settings"):
        CliRunner().invoke(train_stage.cli, [*TRAIN, "--data-dir", str(pool.root)], catch_exceptions=False)
    assert not pool.ranker_model("s").exists()
