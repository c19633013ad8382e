"""Hand-computed cases of the contrastive, predictor and total space losses."""

from __future__ import annotations

import math

import pytest
import torch

from tans.space.contrastive import MARGIN, contrastive_loss, predictor_loss, space_loss


def _m(rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.timeout(20)
def test_zero_when_every_positive_wins_by_the_margin():
    # S = I: positives 1, negatives 0, gap 1 >= 0.2 in both directions
    q = torch.eye(3, dtype=torch.float64)
    assert float(contrastive_loss(q, q.clone())) == 0.0


@pytest.mark.timeout(20)
def test_zero_exactly_at_a_gap_larger_than_margin_and_positive_below_it():
    # q = e1, e2; m0 = (cos a, sin a), m1 = (sin a, cos a): s_ii = cos a, s_ij = sin a
    for gap, expected in [(0.25, 0.0), (0.1, 2 * (MARGIN - 0.1))]:
        # pick a with cos a - sin a = gap
        a = torch.tensor(math.pi / 4 - math.asin(gap / 2**0.5), dtype=torch.float64)
        m = torch.stack([torch.stack([a.cos(), a.sin()]), torch.stack([a.sin(), a.cos()])])
        q = torch.eye(2, dtype=torch.float64)
        assert float(contrastive_loss(q, m)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.timeout(20)
def test_symmetric_violation_hand_computed():
    # S = [[.6, .8], [.8, .6]]: every hinge is .2 - .6 + .8 = .4; mean over i of (qm + mq) = .8
    q = _m([[1, 0], [0, 1]])
    m = _m([[0.6, 0.8], [0.8, 0.6]])
    assert float(contrastive_loss(q, m)) == pytest.approx(0.8, abs=1e-12)


@pytest.mark.timeout(20)
def test_both_directions_use_their_own_hardest_negative():
    # q_i = e_i, so S[i, j] = m_j[i]:  S = [[1, .6, 0], [0, .8, .8], [0, 0, .6]], positives [1, .8, .6]
    q = torch.eye(3, dtype=torch.float64)
    m = _m([[1, 0, 0], [0.6, 0.8, 0], [0, 0.8, 0.6]])
    # query->model: row 0: .2-1+.6 -> 0; row 1: .2-.8+.8 = .2; row 2: .2-.6+0 -> 0
    # model->query: col 0: .2-1+0 -> 0; col 1: .2-.8+.6 = 0; col 2: .2-.6+.8 = .4
    assert float(contrastive_loss(q, m)) == pytest.approx((0.2 + 0.4) / 3, abs=1e-9)
    # pairs 1 and 2 of one task are not negatives of each other: every remaining hinge is <= 0
    assert float(contrastive_loss(q, m, task_ids=torch.tensor([0, 1, 1]))) == pytest.approx(0.0, abs=1e-9)
    # a larger margin: row 0: .5-1+.6=.1, row 1: .5-.8+.8=.5, row 2: .5-.6+0=0 (clamped -.1 -> 0)
    # col 0: .5-1+0 -> 0, col 1: .5-.8+.6=.3, col 2: .5-.6+.8=.7
    assert float(contrastive_loss(q, m, margin=0.5)) == pytest.approx((0.1 + 0.5 + 0.3 + 0.7) / 3, abs=1e-9)


@pytest.mark.timeout(20)
def test_gradient_flows_and_single_pair_batch_is_zero():
    q = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1).requires_grad_()
    m = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    loss = contrastive_loss(q, m)
    loss.backward()
    assert loss.item() > 0 and q.grad.abs().sum() > 0
    assert float(contrastive_loss(q[:1].detach(), m[:1])) == 0.0  # no negative at all


@pytest.mark.timeout(20)
def test_predictor_and_space_loss():
    pred = torch.tensor([0.5, 0.9, 0.1])
    true = torch.tensor([0.7, 0.9, 0.4])
    mse = (0.2**2 + 0.0 + 0.3**2) / 3
    assert float(predictor_loss(pred, true)) == pytest.approx(mse, rel=1e-6)
    q = _m([[1, 0], [0, 1]]).float()
    m = _m([[0.6, 0.8], [0.8, 0.6]]).float()
    total, parts = space_loss(q, m, pred, true, lam=2.0)
    assert float(total) == pytest.approx(0.8 + 2 * mse, rel=1e-5)
    assert parts["contrastive"] == pytest.approx(0.8, rel=1e-5) and parts["mse"] == pytest.approx(mse, rel=1e-5)


@pytest.mark.timeout(20)
def test_extra_negatives_join_the_query_to_model_side_only():
    q = torch.eye(2, dtype=torch.float64)
    m = torch.eye(2, dtype=torch.float64)  # S = I: zero loss on its own
    n = _m([[0.28, 0.96]])  # s(q0, n) = .28 -> .2 - 1 + .28 < 0; s(q1, n) = .96 -> .2 - 1 + .96 = .16
    assert float(contrastive_loss(q, m, extra_negatives=n)) == pytest.approx(0.16 / 2, abs=1e-9)
    assert float(contrastive_loss(q, m, extra_negatives=n[:0])) == 0.0
