"""Cross-validation folds of a dataset's images.

A fold is a set of image ids. :func:`assign_folds` orders a dataset's ids by the sha256 of the
id (a fixed shuffle that does not depend on the machine, the Python hash seed or the order
the ids come in) and deals them to the folds in turn, so the folds are disjoint, cover every
image, and differ in size by at most one image. Each dataset of a pool is dealt on its own,
so every dataset is split evenly across the folds.

Folds are numbered 1..K on the command line (``--fold 2/5``) and in file names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


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
