"""Cross-validation folds of a dataset's images.

A fold is a set of image ids. :func:`assign_folds` orders a dataset's ids by the sha256 of the
id (a fixed shuffle that does not depend on the machine, the Python hash seed or the order
the ids come in) and deals them to the folds in turn, so the folds are disjoint, cover every
image, and differ in size by at most one image. Each dataset of a pool is dealt on its own,
so every dataset is split evenly across the folds.

Folds are numbered 1..K on the command line (``--fold 2/5``) and in file names.
:func:`evaluate_fold` scores one fold's held-out boxes for every method.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pandas as pd

#: the WiderFace subsets of a fold's evaluation
SUBSETS = ("easy", "medium", "hard")
#: NMS of every method (the DAG's postprocess defaults: IoU 0.4, keep 750)
NMS_IOU, NMS_KEEP = 0.4, 750


def parse_fold(text: str) -> tuple[int, int]:
    """``"k/K"`` -> ``(k, K)`` with 1 <= k <= K and K >= 2; ValueError with the expected form."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"fold {text!r}: expected K/N with integers, e.g. 2/5") from None
    if n < 2 or not 1 <= k <= n:
        raise ValueError(f"fold {text!r}: expected 1 <= K <= N and N >= 2")
    return k, n


def _key(image_id: str) -> str:
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def assign_folds(image_ids: Iterable[str], folds: int) -> dict[str, int]:
    """``{image_id: fold}`` with folds numbered 1..``folds``; deterministic, balanced (sizes
    differ by at most one). Duplicate ids are counted once."""
    if folds < 2:
        raise ValueError(f"folds={folds}: cross-validation needs at least 2 folds")
    ordered = sorted(set(map(str, image_ids)), key=lambda i: (_key(i), i))
    return {image_id: n % folds + 1 for n, image_id in enumerate(ordered)}


def fold_ids(image_ids: Iterable[str], fold: int, folds: int, *, complement: bool = False) -> list[str]:
    """The sorted ids in ``fold`` of ``folds`` (or, with ``complement``, in every other fold)."""
    assignment = assign_folds(image_ids, folds)
    return sorted(i for i, f in assignment.items() if (f == fold) != complement)


def subset_groups(gts: dict[str, pd.DataFrame]) -> list[tuple[list[str], bool]]:
    """The datasets evaluated together: those with WiderFace keep lists (``True``: easy / medium
    / hard, the official protocol) and the others (``False``: subset ``all``, VOC AP at IoU 0.5)."""
    with_subsets = [d for d in gts if gts[d][list(SUBSETS)].to_numpy().any()]
    return [(g, official) for g, official in ((with_subsets, True), ([d for d in gts if d not in with_subsets], False))
            if g]


def _prefixed(frames: dict[str, pd.DataFrame], datasets: list[str]) -> pd.DataFrame:
    """The frames of ``datasets`` as one, image ids prefixed with their dataset (``D/ID``)."""
    return pd.concat([frames[d].assign(image_id=d + "/" + frames[d]["image_id"].astype(str)) for d in datasets],
                     ignore_index=True)


def fold_finals(frames: dict[str, pd.DataFrame], methods: list[str], iou: float = NMS_IOU,
                given: dict[str, dict[str, pd.DataFrame]] | None = None) -> dict[str, pd.DataFrame]:
    """``{method: final boxes}`` of held-out rows ``frames`` (dataset -> rows with the score column
    of every method: ``score``, ``rank_score``, ``oracle_iou``, ``ensemble_score``), image ids
    prefixed with their dataset. ``single`` is box voting (``multi``) on a multi-scale set; the
    other methods vote there too. ``iou`` is the NMS / voting IoU (0.4, the library's, the
    CLI's and the DAG's default). ``given`` (method -> dataset -> final boxes) are methods whose
    final boxes were made another way (fusions of several detectors)."""
    from pipeline.postprocess import fuse

    boxes = _prefixed(frames, list(frames))
    multi_view = len(boxes[["scale", "flip"]].drop_duplicates()) > 1
    out = {}
    for method in methods:
        if given and method in given:
            out[method] = _prefixed(given[method], list(given[method]))
            continue
        base = ("multi" if multi_view else "single") if method == "single" else method
        out[method] = fuse(boxes, base, iou, NMS_KEEP, False)
    return out


def score_finals(finals: dict[str, pd.DataFrame], gts: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """``{method: {subset: AP}}`` of final boxes (image ids ``D/ID``) against ``gts`` (dataset ->
    gt rows of the same images)."""
    from pipeline.metrics import WiderFaceEval

    result: dict[str, dict[str, float]] = {m: {} for m in finals}
    for datasets, official in subset_groups(gts):
        gt = _prefixed(gts, datasets)
        for method, final in finals.items():
            mine = final["image_id"].str.split("/", n=1).str[0].isin(datasets)
            ev = WiderFaceEval(gt, final[mine.to_numpy()]).evaluate()
            if official:
                for s in SUBSETS:
                    result[method][s] = ev.subset_curve(s).ap
            else:
                result[method]["all"] = ev.voc_all_curve().ap
    return result


def evaluate_fold(frames: dict[str, pd.DataFrame], gts: dict[str, pd.DataFrame], methods: list[str],
                  iou: float = NMS_IOU) -> dict[str, dict[str, float]]:
    """``{method: {subset: AP}}`` of the held-out rows ``frames`` (:func:`fold_finals`) against
    ``gts`` (dataset -> gt rows of the held-out images)."""
    return score_finals(fold_finals(frames, methods, iou), gts)


def pooled_intervals(finals: pd.DataFrame, gts: dict[str, pd.DataFrame], pairs: list[tuple[str, str]],
                     n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per detector and subset, the AP of every method on all held-out images of a
    cross-validation pooled (each image was held out once, by its fold's ranker) and the paired
    bootstrap 95 % interval (:func:`pipeline.bootstrap.paired_bootstrap`) of each pair's Δ.

    ``finals``: ``cv_finals`` rows (``method``, ``detector``, ``image_id`` as ``D/ID``, boxes,
    ``score``); ``gts``: dataset -> its whole gt table; ``pairs``: (a, b) method names, skipped
    where a method is missing. One row per detector, subset and pair: ``a, b, ap_a, ap_b, delta,
    ci_low, ci_high, n, seed`` (fractions of AP)."""
    from pipeline.bootstrap import paired_bootstrap
    from pipeline.metrics import WiderFaceEval

    rows = []
    for datasets, official in subset_groups(gts):
        gt = _prefixed(gts, datasets)
        for det, part in finals.groupby("detector", sort=True, observed=True):
            part = part[part["image_id"].astype(str).str.split("/", n=1).str[0].isin(datasets).to_numpy()]
            evals = {str(m): WiderFaceEval(gt, f.drop(columns=["method", "detector", "fold"])).evaluate()
                     for m, f in part.groupby("method", sort=True, observed=True)}
            usable = [(a, b) for a, b in pairs if a in evals and b in evals]
            for subset in (SUBSETS if official else ("all",)):
                if usable:
                    table = paired_bootstrap(evals, usable, subset, n=n, seed=seed)
                    rows.append(table.assign(detector=str(det)))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
