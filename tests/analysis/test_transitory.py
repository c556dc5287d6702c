"""Transitory points: hand-made flip counting, equal-count bins, concentration."""

import math

import numpy as np
import pytest

from ptq_adversary import analysis


def test_transitory_points_on_a_hand_made_case():
    labels = np.array([0, 1, 2, 0])
    fp = np.array([[3.0, 1.0, 0.0],  # right, margin 2
                   [0.0, 2.0, 1.5],  # right, margin 0.5
                   [2.0, 0.0, 1.0],  # wrong (true 2): label margin -1
                   [1.0, 1.0, 4.0]])  # wrong  # fmt: skip
    # Input 0 stays right, 1 flips right -> wrong, 2 is fixed (wrong -> right), 3 goes from one
    # wrong class to another (a change, not a flip).
    q = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 1.5], [0.0, 0.0, 1.0], [1.0, 5.0, 4.0]])
    p = {k: np.asarray(v) for k, v in analysis.transitory_points(fp, q, labels).items()}
    np.testing.assert_array_equal(p["fp_correct"], [True, True, False, False])
    np.testing.assert_array_equal(p["q_correct"], [True, False, True, False])
    np.testing.assert_array_equal(p["flip"], [False, True, False, False])
    np.testing.assert_array_equal(p["changed"], [False, True, True, True])
    np.testing.assert_array_equal(p["fixed"], [False, False, True, False])
    np.testing.assert_allclose(p["fp_margin"], [2.0, 0.5, 1.0, 3.0])
    np.testing.assert_allclose(p["fp_label_margin"], [2.0, 0.5, -1.0, -3.0])
    np.testing.assert_allclose(p["fp_confidence"][0], np.exp(3) / (np.exp(3) + np.exp(1) + 1),
                               rtol=1e-6)  # fmt: skip
    summary = analysis.transitory_summary(p, labels, num_classes=3, num_bins=2)
    assert summary["overall"]["flip"] == 0.25 and summary["overall"]["changed"] == 0.75
    # Margins [2, .5, 1, 3]: the low bin holds inputs 1 and 2 (flip rate 1/2, both changed).
    assert summary["by_margin"]["flip"] == [0.5, 0.0]
    assert summary["by_margin"]["changed"] == [1.0, 0.5]
    assert summary["by_margin"]["low"] == [0.5, 2.0] and summary["by_margin"]["high"] == [1.0, 3.0]
    assert summary["by_class"]["flip"] == [0.0, 1.0, 0.0]
    assert summary["by_class"]["count"] == [2, 1, 1]
    assert summary["prediction_share"]["q"] == [0.25, 0.25, 0.5]
    # The only flip is the lowest-margin FP-right input.
    assert summary["concentration"]["flips"]["auroc"] == 1.0
    # DPTQ predicts class 2 most often; without class-2 inputs, 1 flip among 2 FP-right ones.
    assert summary["dominant_class"] == 2 and summary["dominant_share"] == 0.5
    outside = summary["concentration"]["flips_outside_dominant"]
    assert outside["num_eligible"] == 2 and outside["num_flips"] == 1


def test_rank_bins_are_equal_count_whatever_the_ties():
    values = np.array([1.0] * 7 + [0.0] * 3 + [2.0] * 10)
    bins = analysis.rank_bins(values, 4)
    assert np.bincount(bins).tolist() == [5, 5, 5, 5]
    # Monotone: a larger value never lands in a lower bin.
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(bins[order]) >= 0)


def test_average_ranks_give_ties_their_mean_rank():
    np.testing.assert_array_equal(analysis.average_ranks(np.array([5.0, 1.0, 5.0])), [2.5, 1, 2.5])
    np.testing.assert_array_equal(analysis.average_ranks(np.array([3.0, 2.0, 1.0])), [3, 2, 1])
    ranks = analysis.average_ranks(np.array([0.0, 0.0, 0.0, 1.0]))
    np.testing.assert_array_equal(ranks, [2, 2, 2, 4])
    assert analysis.average_ranks(np.array([])).shape == (0,)


def test_class_rates_and_binned_rates_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 3])
    ind = np.array([1, 0, 1, 1, 0, 1], bool)
    r = analysis.class_rates(labels, {"x": ind}, num_classes=4)
    assert r["count"] == [2, 3, 0, 1]
    assert r["x"][:2] == [0.5, pytest.approx(2 / 3)] and math.isnan(r["x"][2]) and r["x"][3] == 1
    b = analysis.binned_rates(np.arange(6.0), {"x": ind}, num_bins=3)
    assert b["count"] == [2, 2, 2] and b["x"] == [0.5, 1.0, 0.5]


def test_flip_concentration_matches_brute_force_auroc_and_shares():
    rng = np.random.default_rng(0)
    margin = np.round(rng.exponential(2.0, 300), 1)  # rounded: many ties
    flip = rng.random(300) < 1 / (1 + margin**2)  # more flips at low margin
    out = analysis.flip_concentration(margin, flip)
    m_f, m_k = margin[flip], margin[~flip]
    less = (m_f[:, None] < m_k[None, :]).mean() + 0.5 * (m_f[:, None] == m_k[None, :]).mean()
    assert out["auroc"] == pytest.approx(less)
    assert out["auroc"] > 0.6  # low margins flip more
    order = np.argsort(margin, kind="stable")
    assert out["share_lowest_10"] == pytest.approx(flip[order[:30]].sum() / flip.sum())
    assert out["num_flips"] == flip.sum() and out["flip_rate"] == pytest.approx(flip.mean())
    # Eligibility restricts the population.
    keep = margin > 1
    sub = analysis.flip_concentration(margin, flip, keep)
    assert sub["num_eligible"] == keep.sum() and sub["num_flips"] == (flip & keep).sum()
    # Flips only on the largest margins: AUROC 0 and none among the lowest half.
    top = np.zeros(300, bool)
    top[np.argsort(margin)[-10:]] = True
    out = analysis.flip_concentration(np.arange(300.0), np.arange(300) >= 290)
    assert out["auroc"] == 0.0 and out["share_lowest_50"] == 0.0
    assert math.isnan(analysis.flip_concentration(margin, np.zeros(300, bool))["auroc"])
