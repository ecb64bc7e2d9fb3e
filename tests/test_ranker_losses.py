"""Ranker losses: brute-force equality, ordering, gradient direction, masking."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranker.losses import pair_accuracy, pairwise_loss, ranker_loss, regression_loss


def brute_force(pred, oracle, mask, n_pairs, margin):
    total = 0.0
    for k in range(1, n_pairs + 1):
        terms = []
        for b in range(pred.shape[0]):
            for i in range(pred.shape[1] - k):
                j = i + k
                if not (mask[b, i] and mask[b, j]) or oracle[b, i] == oracle[b, j]:
                    continue
                y = 1.0 if oracle[b, i] > oracle[b, j] else 0.0
                d = float(pred[b, i] - pred[b, j])
                gap = abs(float(oracle[b, i] - oracle[b, j]))
                s = 1.0 if y == 1.0 else -1.0
                z = s * d - margin * gap
                terms.append(math.log1p(math.exp(-z)))  # -log(sigmoid(z))
        if terms:
            total += sum(terms) / len(terms)
    return total / n_pairs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_pairs=st.integers(1, 4), margin=st.sampled_from([0.0, 1.0]),
       n=st.integers(2, 9))
def test_pairwise_equals_brute_force(seed, n_pairs, margin, n):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(2, n, generator=g, dtype=torch.float64)
    oracle = torch.randint(0, 3, (2, n), generator=g).double() / 2  # many ties
    mask = torch.rand(2, n, generator=g) > 0.2
    got = float(pairwise_loss(pred, oracle, mask, n_pairs=n_pairs, margin=margin))
    assert got == pytest.approx(brute_force(pred, oracle, mask, n_pairs, margin), rel=1e-6, abs=1e-9)


def test_matching_order_has_lower_loss_than_reversed():
    oracle = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1, 0.0]])
    mask = torch.ones_like(oracle, dtype=torch.bool)
    right = oracle.clone()
    wrong = oracle.flip(1)
    assert pairwise_loss(right, oracle, mask, 3) < pairwise_loss(wrong, oracle, mask, 3)
    assert pair_accuracy(right, oracle, mask) == 1.0
    assert pair_accuracy(wrong, oracle, mask) == 0.0


def test_gradient_step_moves_misordered_pair_toward_right_order():
    oracle = torch.tensor([[0.2, 0.8]])  # the second box is closer to a face
    mask = torch.ones(1, 2, dtype=torch.bool)
    pred = torch.tensor([[0.7, 0.4]], requires_grad=True)  # ...but scores lower
    loss = pairwise_loss(pred, oracle, mask, n_pairs=1)
    loss.backward()
    with torch.no_grad():
        stepped = pred - 0.5 * pred.grad
    assert pred.grad[0, 0] > 0 and pred.grad[0, 1] < 0
    assert (stepped[0, 1] - stepped[0, 0]) > (pred[0, 1] - pred[0, 0])
    assert pairwise_loss(stepped, oracle, mask, n_pairs=1) < loss


def test_padded_slots_never_enter_a_loss():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 12, generator=g)
    oracle = torch.rand(2, 12, generator=g)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :7] = True
    mask[1, :3] = True
    other_pred, other_oracle = pred.clone(), oracle.clone()
    other_pred[~mask] = 0.123
    other_oracle[~mask] = 0.987
    for kind in ("pairwise", "ce", "l1", "l2", "smoothl1"):
        a = ranker_loss(kind, pred, oracle, mask, n_pairs=4)
        b = ranker_loss(kind, other_pred, other_oracle, mask, n_pairs=4)
        assert float(a) == float(b), kind


def test_regression_losses_against_formulas():
    pred = torch.tensor([[0.2, 0.9, 0.5]])
    oracle = torch.tensor([[0.0, 1.0, 0.9]])
    mask = torch.tensor([[True, True, False]])
    assert float(regression_loss(pred, oracle, mask, "l1")) == pytest.approx((0.2 + 0.1) / 2)
    assert float(regression_loss(pred, oracle, mask, "l2")) == pytest.approx((0.04 + 0.01) / 2)
    ce = -(math.log(0.8) + math.log(0.9)) / 2
    assert float(regression_loss(pred, oracle, mask, "ce")) == pytest.approx(ce, rel=1e-5)
    # smooth L1 with beta 0.1: both errors >= beta -> |e| - beta/2
    assert float(regression_loss(pred, oracle, mask, "smoothl1")) == pytest.approx((0.15 + 0.05) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        regression_loss(pred, oracle, mask, "hinge")


def test_margin_pushes_pairs_apart():
    oracle = torch.tensor([[0.9, 0.1]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    pred = torch.tensor([[0.6, 0.4]])
    assert pairwise_loss(pred, oracle, mask, 1, margin=1.0) > pairwise_loss(pred, oracle, mask, 1)


def test_pair_accuracy_counts_ties_as_half():
    oracle = torch.tensor([[0.9, 0.5, 0.2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert pair_accuracy(torch.tensor([[0.0, 0.0, 0.0]]), oracle, mask) == 0.5
    assert pair_accuracy(torch.tensor([[0.9, 0.1, 0.5]]), oracle, mask) == 0.5
    assert math.isnan(pair_accuracy(torch.zeros(1, 3), torch.zeros(1, 3), mask))
