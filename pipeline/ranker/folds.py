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


def evaluate_fold(frames: dict[str, pd.DataFrame], gts: dict[str, pd.DataFrame], methods: list[str],
                  iou: float = NMS_IOU) -> dict[str, dict[str, float]]:
    """``{method: {subset: AP}}`` of the held-out boxes ``frames`` (dataset -> rows with the
    score column of every method: ``score``, ``rank_score``, ``oracle_iou``, ``ensemble_score``)
    against ``gts`` (dataset -> gt rows of the held-out images). ``single`` is box voting
    (``multi``) on a multi-scale set; the other methods vote there too. ``iou`` is the NMS /
    voting IoU (0.4, the library's, the CLI's and the DAG's default)."""
    from pipeline.metrics import WiderFaceEval
    from pipeline.postprocess import fuse

    with_subsets = [d for d in frames if gts[d][["easy", "medium", "hard"]].to_numpy().any()]
    groups = [(with_subsets, True), ([d for d in frames if d not in with_subsets], False)]
    result: dict[str, dict[str, float]] = {m: {} for m in methods}
    for datasets, official in groups:
        if not datasets:
            continue
        gt = pd.concat([gts[d].assign(image_id=d + "/" + gts[d]["image_id"]) for d in datasets], ignore_index=True)
        boxes = pd.concat([frames[d].assign(image_id=d + "/" + frames[d]["image_id"]) for d in datasets], ignore_index=True)
        multi_view = len(boxes[["scale", "flip"]].drop_duplicates()) > 1
        for method in methods:
            base = ("multi" if multi_view else "single") if method == "single" else method
            final = fuse(boxes, base, iou, NMS_KEEP, False)
            ev = WiderFaceEval(gt, final).evaluate()
            if official:
                for s in SUBSETS:
                    result[method][s] = ev.subset_curve(s).ap
            else:
                result[method]["all"] = ev.voc_all_curve().ap
    return result
