"""Ranker losses (seed 000, section 3.2): the pairwise ranking loss and regression baselines.

All functions take ``pred`` (refined confidences c', ``(B, N)``), ``oracle`` (oracle
confidences = IoU with the closest ground-truth face, ``(B, N)``) and ``mask`` (``(B, N)``
bool, True on real boxes). Slots are in the order of the detector's confidence, descending
(the order :func:`pipeline.ranker.data.box_matrix` builds). Padded slots never enter a loss.

Pairwise loss, with n pairs: for k = 1..n the pairs (i, i+k) of real slots; the target says
which box is closer to a face: y = 1 when oracle_i > oracle_{i+k}, y = 0 when it is lower,
and the loss is the sigmoid cross-entropy of the difference d = c'_i - c'_{i+k}:
``BCEWithLogits(d, y)``. Pairs with equal oracle confidence (most often two boxes that touch
no face, oracle 0) carry no order and are skipped. Each group k is averaged over its valid
pairs in the batch and divided by n, so ``loss = (1/n) * sum_k mean_pairs_k``; a group with
no valid pair contributes 0. (The paper's eq. 1-2 write the label and the log terms with the
roles swapped; the meaning implemented is "the box closer to a face must score higher".)

Margin rescaling (``margin > 0``): the logit of a pair becomes ``s*d - margin*|oracle_i -
oracle_{i+k}|`` with s = +1 or -1 the correct sign and target 1, i.e. the predicted gap
has to exceed a margin proportional to the oracle gap before the loss saturates.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.ranker.settings import LOSSES


def _pairs(pred: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor, k: int):
    """(d, sign, gap) of the valid non-tied pairs (i, i+k), flattened over the batch."""
    d = pred[:, :-k] - pred[:, k:]
    delta = oracle[:, :-k] - oracle[:, k:]
    valid = mask[:, :-k] & mask[:, k:] & (delta != 0)
    return d[valid], torch.sign(delta[valid]), delta[valid].abs()


def pairwise_loss(pred: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor,
                  n_pairs: int = 10, margin: float = 0.0) -> torch.Tensor:
    """The n-pairs ranking loss described in the module docstring; a scalar."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    total = pred.new_zeros(())
    for k in range(1, min(n_pairs, pred.shape[1] - 1) + 1):
        d, sign, gap = _pairs(pred.float(), oracle.float(), mask, k)
        if d.numel():
            logits = sign * d - margin * gap
            total = total + F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    return total / n_pairs


def regression_loss(pred: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """CE (binary cross-entropy of c' against the soft target oracle), L1, L2 or smooth L1
    (beta 0.1 in confidence units), averaged over the real slots of the batch."""
    p, t = pred.float()[mask], oracle.float()[mask]
    if p.numel() == 0:
        return pred.float().sum() * 0.0  # keeps the graph when a batch has no real box
    if kind == "ce":
        return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), t)
    if kind == "l1":
        return F.l1_loss(p, t)
    if kind == "l2":
        return F.mse_loss(p, t)
    if kind == "smoothl1":
        return F.smooth_l1_loss(p, t, beta=0.1)
    raise ValueError(f"unknown regression loss {kind!r}; known: {LOSSES[1:]}")


def ranker_loss(kind: str, pred: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor,
                n_pairs: int = 10, margin: float = 0.0) -> torch.Tensor:
    """Dispatch on ``kind`` (one of :data:`LOSSES`)."""
    if kind == "pairwise":
        return pairwise_loss(pred, oracle, mask, n_pairs=n_pairs, margin=margin)
    return regression_loss(pred, oracle, mask, kind)


@torch.no_grad()
def pair_accuracy(pred: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of neighbour pairs (k = 1, oracle not tied) that the refined confidences put in
    the oracle order, a tie in c' counting one half (as in AUC; clipping to [0, 1] makes
    ties); NaN when the batch has no such pair."""
    d, sign, _ = _pairs(pred.float(), oracle.float(), mask, 1)
    if d.numel() == 0:
        return float("nan")
    agree = torch.sign(d) * sign  # +1 right order, 0 tie, -1 wrong
    return float(((agree + 1) / 2).mean())
