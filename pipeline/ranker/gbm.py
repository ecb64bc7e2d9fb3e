"""The feature ranker: gradient-boosted trees (LightGBM) on per-box features.

Each box is a row of :data:`pipeline.ranker.features.FEATURES`; the target is its oracle
confidence (IoU with the closest ground-truth face). The model's output is the new
confidence, in [0, 1]:

- ``binary`` (default): label 1 when the oracle IoU is >= 0.5 (a face the evaluation would
  count); the output estimates the probability that the box is a true positive. One
  calibrated score for every image is what the WiderFace protocol needs (it thresholds
  scores over the whole set, not per image). In cross-validation it beat ``cross_entropy``
  by 1.5 to 3.4 Hard AP points per detector (docs/ranker-results.md).
- ``cross_entropy``: the oracle IoU is the soft label of a logistic model, so the output
  estimates the box's IoU with a face (it ranks a well-placed box on a large face above a
  true positive on a small one, which costs Hard AP).
- ``lambdarank`` and ``rank_xendcg``: LightGBM's listwise rankers within each image (group),
  relevance 0..3 from the oracle IoU (< .3, .3–.5, .5–.7, >= .7);
- ``pairwise``: seed 000's loss as a custom objective: within each image, rows sorted by
  detector score, the pairs (r, r + k) for k = 1..10 whose oracle IoUs differ, logistic loss
  on the score difference (with margin rescaling as in its table 1 when ``pair_margin > 0``).

The within-image objectives' raw output is squashed with a sigmoid (ranks within an image are
what they learn, not a scale shared by images).

Training is deterministic for a given seed and thread count (``deterministic=True``,
``force_row_wise``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfrankError
from pipeline.ranker.features import feature_columns
from pipeline.ranker.registry import Fitted, FitRun, ScoreContext, neighbour_pair_accuracy
from pipeline.ranker.settings import GbmConfig

PAYLOAD_FORMAT = "confrank-ranker-gbm"
#: lambdarank relevance grades: oracle IoU at or above each edge adds one grade
RELEVANCE_EDGES = (0.3, 0.5, 0.7)
#: pairwise objective: pairs (r, r + k) for k = 1..PAIR_SKIP in detector-score order (seed 000's n)
PAIR_SKIP = 10
#: objectives that learn an order within each image (their raw output goes through a sigmoid)
WITHIN_IMAGE = ("lambdarank", "rank_xendcg", "pairwise")


def params(config: GbmConfig, threads: int) -> dict[str, Any]:
    """LightGBM parameters of ``config`` (the ``pairwise`` objective is passed as a callable)."""
    return {
        "objective": config.objective, "learning_rate": config.learning_rate, "num_leaves": config.leaves,
        "min_data_in_leaf": config.min_leaf, "feature_fraction": config.feature_fraction,
        "bagging_fraction": config.bagging_fraction, "bagging_freq": 1 if config.bagging_fraction < 1 else 0,
        "lambda_l2": config.l2, "max_bin": config.max_bin, "seed": config.seed, "num_threads": threads,
        "deterministic": True, "force_row_wise": True, "verbose": -1,
    }


def relevance(oracle: np.ndarray) -> np.ndarray:
    """Integer grades 0..3 of oracle IoUs for LambdaRank (see :data:`RELEVANCE_EDGES`)."""
    return np.searchsorted(np.asarray(RELEVANCE_EDGES), np.asarray(oracle, np.float64), side="right").astype(np.int32)


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal labels in ``groups`` ``(n,)``; ConfrankError when one label
    comes back after another (the rows of one image must be consecutive)."""
    groups = np.asarray(groups)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    if len(starts) != len(np.unique(groups)):
        raise ConfrankError("gbm: the rows of one image must be consecutive")
    return np.diff(np.r_[starts, len(groups)])


def neighbour_pairs(groups: np.ndarray, score: np.ndarray, oracle: np.ndarray, skip: int = PAIR_SKIP) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(i, j)`` of seed 000's training pairs: within each group, rows sorted by
    detector ``score`` descending, the pairs (r, r + k) for k = 1..``skip``, kept when their
    oracle IoUs differ; ``i`` is the row of the higher oracle IoU. Both ``(P,)`` int64."""
    order = np.lexsort((-np.asarray(score, np.float64), groups))
    g, o = np.asarray(groups)[order], np.asarray(oracle, np.float64)[order]
    first, second = [], []
    for k in range(1, skip + 1):
        a, b = np.arange(len(order) - k), np.arange(k, len(order))
        ok = (g[a] == g[b]) & (o[a] != o[b])
        a, b = a[ok], b[ok]
        better = o[a] > o[b]
        first.append(np.where(better, order[a], order[b]))
        second.append(np.where(better, order[b], order[a]))
    return np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64)


def pairwise_objective(pairs: tuple[np.ndarray, np.ndarray], gap: np.ndarray, n: int):
    """LightGBM objective of the pairwise loss: for each pair (i better than j) the logistic
    loss ``log(1 + exp(-(f_i - f_j - gap)))`` (``gap`` = margin x the oracle gap, 0 = seed 000's
    loss without margin); returns ``fobj(preds, data) -> (grad, hess)`` over ``n`` rows."""
    first, second = pairs

    def fobj(preds: np.ndarray, _data) -> tuple[np.ndarray, np.ndarray]:
        z = preds[first] - preds[second] - gap
        p = 1.0 / (1.0 + np.exp(z))  # sigmoid(-z): the share of the pair still wrong
        h = np.maximum(p * (1.0 - p), 1e-6)
        grad = np.bincount(first, -p, n) + np.bincount(second, p, n)
        hess = np.bincount(first, h, n) + np.bincount(second, h, n)
        return grad, np.maximum(hess, 1e-6)

    return fobj


def train_gbm(x: np.ndarray, oracle: np.ndarray, config: GbmConfig, groups: np.ndarray | None = None,
              threads: int = 0, score: np.ndarray | None = None):
    """A LightGBM booster trained on ``x`` ``(n, F)`` float32 with targets from ``oracle``
    ``(n,)`` (IoU in [0, 1]). ``groups`` ``(n,)`` int labels of each row's image (one image's
    rows consecutive) and ``score`` ``(n,)`` the detector confidences: the within-image
    objectives need the groups, ``pairwise`` both."""
    import lightgbm as lgb

    oracle = np.asarray(oracle, np.float64)
    if config.objective == "binary":
        label = (oracle >= 0.5).astype(np.float64)
    elif config.objective in ("lambdarank", "rank_xendcg"):
        label = relevance(oracle)
    else:
        label = np.clip(oracle, 0.0, 1.0)
    data = lgb.Dataset(np.asarray(x, np.float32), label, free_raw_data=True)
    settings = params(config, threads)
    if config.objective in WITHIN_IMAGE:
        if groups is None:
            raise ConfrankError(f"gbm objective {config.objective} needs the image of each row")
        sizes = group_sizes(groups)
        if config.objective != "pairwise":
            data.set_group(sizes)
    if config.objective == "pairwise":
        if score is None:
            raise ConfrankError("gbm objective pairwise needs the detector score of each row")
        pairs = neighbour_pairs(groups, score, oracle)
        gap = config.pair_margin * np.abs(oracle[pairs[0]] - oracle[pairs[1]])
        settings["objective"] = pairwise_objective(pairs, gap, len(oracle))
    return lgb.train(settings, data, num_boost_round=config.trees)


def predict_gbm(booster, x: np.ndarray, config: GbmConfig, trees: int | None = None) -> np.ndarray:
    """New confidences ``(n,)`` float32 in [0, 1] (from the first ``trees`` trees when given)."""
    raw = booster.predict(np.asarray(x, np.float32), num_threads=1, num_iteration=trees)
    if config.objective in WITHIN_IMAGE:
        raw = 1.0 / (1.0 + np.exp(-raw))
    return np.asarray(raw, np.float32)


def gbm_payload(booster, config: GbmConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``model.pt`` holds for a feature ranker (plain types: loads with weights_only)."""
    return {"format": PAYLOAD_FORMAT, "version": 1, "config": config.to_dict(),
            "booster": booster.model_to_string(), "extra": extra or {}}


def gbm_from_payload(payload: Any, source: str):
    """(booster, config) from :func:`gbm_payload`'s dict; ConfrankError naming ``source``."""
    import lightgbm as lgb

    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise ConfrankError(f"{source}: not a confrank feature-ranker model")
    stored = dict(payload["config"])
    if not stored.get("features"):  # written before feature groups existed: every group of that time
        stored["features"] = ["own", "neighbours", "evidence"]
    config = GbmConfig(**stored)
    return lgb.Booster(model_str=payload["booster"]), config


def loss_curve(booster, x: np.ndarray, oracle: np.ndarray, config: GbmConfig, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(trees, training loss) every ``every`` trees and at the end, on at most 20,000 evenly
    spaced training rows (the curve's shape, at a small cost): the cross entropy of the
    predicted confidence against the label (IoU >= 0.5 for ``binary``, else the IoU itself)."""
    trees = np.unique(np.r_[np.arange(every, config.trees, every), config.trees])
    step = max(1, len(x) // 20_000)
    x, oracle = x[::step], oracle[::step]
    target = (oracle >= 0.5).astype(np.float64) if config.objective == "binary" else np.clip(oracle, 0, 1)
    losses = []
    for n in trees:
        p = np.clip(predict_gbm(booster, x, config, int(n)).astype(np.float64), 1e-7, 1 - 1e-7)
        losses.append(float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))))
    return trees.astype(np.int64), np.asarray(losses, np.float32)


def fitted(booster, x: np.ndarray, oracle: np.ndarray, group: np.ndarray, score: np.ndarray, config: GbmConfig,
           seconds: float, log_every: int, model: Any = None) -> Fitted:
    """The :class:`Fitted` of trees trained on rows ``x`` (targets ``oracle``, images ``group``,
    detector scores ``score``) in ``seconds``: the loss curve (:func:`loss_curve`), the neighbour
    pair accuracy on the training rows, rows per second; ``model`` replaces the booster as what
    is stored (a learned fusion keeps two)."""
    accuracy = neighbour_pair_accuracy(group, score, predict_gbm(booster, x, config), oracle)
    trees, losses = loss_curve(booster, x, oracle, config, log_every)
    log = pd.DataFrame({"step": trees, "loss": losses, "lr": config.learning_rate,
                        "pair_accuracy": np.r_[np.full(len(trees) - 1, np.nan), accuracy],
                        "samples_per_s": len(x) / max(seconds, 1e-9)})
    summary = {"rows": len(x), "seconds": seconds, "pair_accuracy": accuracy, "loss": float(losses[-1]),
               "trees": config.trees}
    return Fitted(booster if model is None else model, log, True, summary)


class GbmRanker:
    """The ``gbm`` kind (:mod:`pipeline.ranker.registry`): reads feature rows (the columns of
    :func:`pipeline.ranker.features.feature_columns` of its groups), one model for every detector."""

    def describe(self, settings: GbmConfig) -> str:
        return f"gbm, {settings.objective}, {'+'.join(settings.features)}"

    def fit(self, rows: pd.DataFrame, settings: GbmConfig, run: FitRun) -> Fitted:
        """Train on feature rows with ``oracle_iou``, ``score`` and ``_group`` (one image's boxes of
        one detector / scale / flip consecutive)."""
        x = rows[feature_columns(settings.features)].to_numpy(np.float32)
        oracle = rows["oracle_iou"].to_numpy(np.float64)
        group = rows["_group"].to_numpy()
        score = rows["score"].to_numpy(np.float64)
        t0 = time.perf_counter()
        booster = train_gbm(x, oracle, settings, group, threads=run.workers, score=score)
        return fitted(booster, x, oracle, group, score, settings, time.perf_counter() - t0, run.log_every)

    def score(self, booster, settings: GbmConfig, frame: pd.DataFrame, context: ScoreContext) -> np.ndarray:
        return predict_gbm(booster, frame[feature_columns(settings.features)].to_numpy(np.float32), settings)

    def payload(self, booster, settings: GbmConfig, extra: dict[str, Any]) -> dict[str, Any]:
        return gbm_payload(booster, settings, extra)

    def from_payload(self, payload: Mapping[str, Any], source: str, device: Any):
        return gbm_from_payload(payload, source)
