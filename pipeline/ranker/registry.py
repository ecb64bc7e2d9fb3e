"""The ranker registry: every kind of ranker, what it reads, and how it fits, scores and is stored.

Like :mod:`pipeline.detectors.registry`, listing the kinds imports no model code: each
:class:`RankerKind` names its implementation as ``"module:Class"``, imported on first use. The
stages (``confrank train``, ``rerank``, ``cv``) and the rules ask this registry; none of them
branches on the kind.

A kind's settings object comes from option values (``settings``, a light function of
:mod:`pipeline.ranker.settings`: the config checks and the rules use it without importing
torch); it says which other detectors' boxes (``evidence_set``) and whether the image evidence
columns (``image_features``) the rows it reads must carry. An implementation (:class:`Ranker`) has:

- ``fit(data, settings, run)``: trains on :class:`BoxData` (``reads == "boxes"``: oracle-annotated
  box groups and an image reader) or a feature frame (``reads == "features"``: the rows of
  ``confrank features`` shards with ``oracle_iou``), returns a :class:`Fitted`;
- ``score(model, settings, frame, context)``: the new confidence of every row of ``frame``
  (rows as they were read for this kind), ``(n,)`` float32 in [0, 1];
- ``payload(model, settings, extra)`` / ``from_payload(payload, source, device)``: what
  ``model.pt`` holds (plain types and tensors, loaded with ``weights_only=True``).
- ``describe(settings)``: a few words for the loss plot's title.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipeline.errors import ConfrankError
from pipeline.ranker.settings import KIND_NAMES

#: what a kind trains on and re-scores: box groups with images, or per-box feature rows
READS = ("boxes", "features")


@dataclass
class BoxData:
    """Training input of a ``boxes`` ranker: images with their oracle-annotated box groups
    (:class:`pipeline.ranker.data.TrainImage`) and ``read_image(key) -> RGB uint8 array``."""

    images: list
    read_image: Callable[[str], np.ndarray]


@dataclass
class FitRun:
    """How one training run goes: where its checkpoint lives (``out``), the run's identity
    (``run_config``: a checkpoint of another identity is not resumed), the device and workers,
    the optional early stop (``stop_after`` steps: leaves only a checkpoint) and the spacing of
    the training log's rows (``log_every`` trees, for the feature ranker)."""

    out: Path
    run_config: dict[str, Any]
    device: str = "auto"
    workers: int = 0
    checkpoint_every: int = 1000
    stop_after: int | None = None
    log_every: int = 10


@dataclass
class Fitted:
    """A finished (``done``) or interrupted training run: the model, the training log
    (``step, loss, lr, pair_accuracy, samples_per_s``), a summary for the command's last line."""

    model: Any
    log: pd.DataFrame
    done: bool = True
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreContext:
    """What scoring may need besides the rows: ``sizes[image_id] = (width, height)``,
    ``read_image(image_id)`` (RGB uint8), the torch device and the batch size."""

    sizes: Mapping[str, tuple[int, int]]
    read_image: Callable[[str], np.ndarray] | None = None
    device: Any = None
    batch_size: int = 8


class Ranker(Protocol):
    def fit(self, data: Any, settings: Any, run: FitRun) -> Fitted: ...
    def score(self, model: Any, settings: Any, frame: pd.DataFrame, context: ScoreContext) -> np.ndarray: ...
    def payload(self, model: Any, settings: Any, extra: dict[str, Any]) -> dict[str, Any]: ...
    def from_payload(self, payload: Mapping[str, Any], source: str, device: Any) -> tuple[Any, Any]: ...
    def describe(self, settings: Any) -> str: ...


@dataclass(frozen=True)
class RankerKind:
    """A registry entry: the kind's name, what it reads, its ``model.pt`` format tag, the
    function that makes its settings from option values and its implementation (both
    ``"module:attribute"``, imported on first use)."""

    name: str
    description: str
    reads: str
    payload_format: str
    settings: str
    implementation: str
    #: it fuses several detectors' boxes into final boxes (``confrank fuse``) instead of
    #: re-scoring one detector's (``confrank rerank``)
    fuses: bool = False

    def impl(self) -> Ranker:
        return _resolve(self.implementation)()

    def make_settings(self, values: Mapping[str, Any], where: str = "ranker settings") -> Any:
        return _resolve(self.settings)(values, where)


def _resolve(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


KINDS: dict[str, RankerKind] = {
    kind.name: kind
    for kind in (
        RankerKind("network", "seed 000's ranker network (image branch + box processing network), or the box-only MLP",
                   "boxes", "confrank-ranker", "pipeline.ranker.settings:network_settings",
                   "pipeline.ranker.network:NetworkRanker"),
        RankerKind("gbm", "gradient-boosted trees (LightGBM) on per-box features", "features",
                   "confrank-ranker-gbm", "pipeline.ranker.settings:gbm_settings", "pipeline.ranker.gbm:GbmRanker"),
        RankerKind("fusion", "a learned fusion of several detectors' boxes: trees on clusters of their boxes",
                   "features", "confrank-ranker-fusion", "pipeline.ranker.settings:fusion_settings",
                   "pipeline.ranker.fusion:FusionRanker", fuses=True),
    )
}
assert tuple(KINDS) == KIND_NAMES, "pipeline.ranker.settings.KIND_NAMES lists the registry's kinds"


def get_kind(name: str) -> RankerKind:
    """The registry entry of ranker kind ``name``; a clear error listing the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfrankError(f"unknown ranker kind {name!r}; known: {', '.join(KINDS)}") from None


def kind_of(values: Mapping[str, Any]) -> RankerKind:
    """The kind of a set of option values (``model``; the default kind when absent)."""
    return get_kind(values.get("model") or KIND_NAMES[0])


def settings_of(values: Mapping[str, Any], where: str = "ranker settings") -> tuple[RankerKind, Any]:
    """(kind, settings object) of option values (``{option name: value}``, e.g. a resolved preset)."""
    kind = kind_of(values)
    return kind, kind.make_settings(values, where)


@dataclass
class LoadedRanker:
    """A stored ranker, ready to score: its kind, model and settings."""

    kind: RankerKind
    model: Any
    settings: Any
    #: the ``confrank image-features`` settings of the image evidence it trained on (None when it
    #: reads none, or was trained before they were recorded)
    image_evidence: dict[str, Any] | None = None

    def score(self, frame: pd.DataFrame, context: ScoreContext) -> np.ndarray:
        return self.kind.impl().score(self.model, self.settings, frame, context)

    def to_dict(self) -> dict[str, Any]:
        return self.settings.to_dict()


def load_ranker(path: Path, device: Any = None) -> LoadedRanker:
    """The ranker stored at ``path`` (a ``model.pt`` of ``confrank train``); its kind comes from
    the payload's format tag. MissingInputError / ConfrankError naming the file."""
    import torch

    from pipeline.errors import MissingInputError

    if not path.is_file():
        raise MissingInputError(f"{path}: no ranker model; run `confrank train --ranker {path.parent.name} ...` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfrankError(f"{path}: not a confrank ranker model ({type(exc).__name__}: {first})") from exc
    fmt = payload.get("format") if isinstance(payload, dict) else None
    for kind in KINDS.values():
        if kind.payload_format == fmt:
            model, settings = kind.impl().from_payload(payload, str(path), device)
            run_config = (payload.get("extra") or {}).get("run_config") or {}
            return LoadedRanker(kind, model, settings, run_config.get("image_evidence"))
    raise ConfrankError(f"{path}: not a confrank ranker model (expected a model.pt written by `confrank train`)")


def neighbour_pair_accuracy(group: np.ndarray, score: np.ndarray, pred: np.ndarray, oracle: np.ndarray) -> float:
    """Share of neighbour pairs (consecutive by detector score within a group, oracle not
    tied) that ``pred`` orders as the oracle does (ties count half); NaN without pairs."""
    import math

    order = np.lexsort((-score, group))
    g, p, o = group[order], pred[order], oracle[order]
    same = (g[1:] == g[:-1]) & (o[1:] != o[:-1])
    if not same.any():
        return math.nan
    want = np.sign(o[:-1] - o[1:])[same]
    got = np.sign(p[:-1] - p[1:])[same]
    return float(np.mean(np.where(got == 0, 0.5, got == want)))

