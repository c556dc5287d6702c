"""Assessment analyses: hand-made flip counting, bins, concentration, layer-wise, statistics."""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import analysis, artifacts, data, evaluation, models

CHOICES = (2, 3, 4, 5, 6, 8)
WIDTHS = (4, 4, 8, 8)


# ---------------------------------------------------------------- a tiny pair on disk (shared)
def tiny_dataset(n_test: int = 40, size: int = 16, seed: int = 0) -> data.Dataset:
    """A synthetic 10-class dataset of ``size``-pixel grey images (no files needed)."""
    rng = np.random.default_rng(seed)

    def split(n):
        images = np.zeros((n, size, size, 1), np.uint8)
        labels = (np.arange(n) % 10).astype(np.int32)
        for i, y in enumerate(labels):  # a bright square whose place depends on the class
            r, c = 2 + (y % 5) * (size // 8), 2 + (y // 5) * (size // 3)
            images[i, r : r + 4, c : c + 5, 0] = 120 + 12 * y
        images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
        return data.Split(images=images, labels=labels)

    return data.Dataset(
        name="fashion_mnist", train=split(20), val=split(10), test=split(n_test),
        num_classes=10, image_shape=(size, size, 1),
        class_names=tuple(f"class{i}" for i in range(10)),
        mean=np.asarray([0.3], np.float32), std=np.asarray([0.3], np.float32),
    )  # fmt: skip


def save_tiny_pair(pair_dir: str, seed: int) -> None:
    """Writes ``pair_dir/best/{model,policy}``: an untrained tiny cnn and a non-trivial policy."""
    model = models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(seed), widths=WIDTHS
    )
    _, params, rest = models.split_model(model)
    spec = artifacts.ModelSpec("cnn", 10, 1, 8, {"widths": WIDTHS})
    artifacts.save_model(os.path.join(pair_dir, "best", "model"), spec, params, rest)
    pspec = artifacts.PolicySpec(num_sites=4, in_channels=1, choices=CHOICES, budget=4.0,
                                 widths=(4,))  # fmt: skip
    _, pparams, prest = nnx.split(artifacts.build_policy(pspec, seed), nnx.Param, ...)
    # The policy head starts at zero (every input the same allocation); perturb it so that
    # allocations differ between sites and inputs.
    rng = np.random.default_rng(seed)
    pparams = jax.tree.map(lambda x: x + 2.0 * rng.standard_normal(x.shape, np.float32), pparams)
    artifacts.save_policy(os.path.join(pair_dir, "best", "policy"), pspec, pparams, prest)


def fake_results(seed: int) -> dict:
    """A pipeline ``results.json`` with the README schema and seed-dependent numbers."""
    pair = lambda fp, q: {
        "fp_accuracy": fp, "dptq_accuracy": q, "drop": 100 * (fp - q),
        "uniform_drop": 1.0 + seed, "random_drop": 5.0 + seed, "flip_rate": fp - q + 0.01,
        "mean_bits": 4.0, "budget": 4.0,
    }  # fmt: skip
    return {
        "dataset": "fashion_mnist", "teacher_model": "teacher_cnn", "student_model": "cnn",
        "choices": list(CHOICES), "budget": 4.0,
        "teacher": {"test_accuracy": 0.91 + 0.001 * seed},
        "student": {"test_accuracy": 0.89 + 0.001 * seed},
        "pairs": {"robust": pair(0.89, 0.888 - 0.001 * seed),
                  "detrimental": pair(0.88, 0.10 + 0.01 * seed)},
        "max_fp_gap_points": 0.3 + 0.1 * seed,
    }  # fmt: skip


def make_fake_run(run_dir: str, seed: int, modes=("robust", "detrimental")) -> None:
    """A pipeline workdir with the pairs' artifacts and a results.json (no training)."""
    for mode in modes:
        save_tiny_pair(os.path.join(run_dir, mode), seed=10 * seed + (mode == "detrimental"))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(fake_results(seed), f)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    make_fake_run(run_dir, seed=0, modes=("detrimental",))  # one pair keeps the test fast
    return run_dir, tiny_dataset()


# --------------------------------------------------------------------------- transitory
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


# ---------------------------------------------------------------------------- layer-wise
def test_bit_histogram_class_bits_and_allocation_summary():
    bit_idx = np.array([[0, 5], [0, 5], [2, 2], [3, 1]])
    hist = analysis.bit_histogram(bit_idx, 6)
    np.testing.assert_allclose(hist[0], [0.5, 0, 0.25, 0.25, 0, 0])
    np.testing.assert_allclose(hist.sum(1), 1.0)
    bits = np.asarray(CHOICES)[bit_idx]
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(analysis.class_mean_bits(bits, labels, 2), [[2, 8], [4.5, 3.5]])

    summary = analysis.allocation_summary(bit_idx, labels, CHOICES)
    assert summary["num_distinct"] == 3 and summary["modal_bits"] == [2, 8]
    assert summary["modal_share"] == 0.5 and summary["entropy_bits"] == pytest.approx(1.5)
    # I(class; allocation) = H(class) = 1 bit: the allocation determines the class.
    assert summary["class_mutual_information_bits"] == pytest.approx(1.0)
    constant = analysis.allocation_summary(np.zeros((4, 2), int), labels, CHOICES)
    assert constant["num_distinct"] == 1 and constant["entropy_bits"] == 0.0
    assert constant["class_information_fraction"] == 0.0
    by_class = analysis.allocation_summary(np.stack([labels, labels], 1), labels, CHOICES)
    assert by_class["class_information_fraction"] == pytest.approx(1.0)


def test_sensitivity_allocations_layout():
    bits = analysis.sensitivity_allocations((2, 4, 8), num_sites=2)
    np.testing.assert_array_equal(bits, [[8, 8], [2, 8], [4, 8], [8, 8], [8, 2], [8, 4], [8, 8]])


def test_sensitivity_of_a_site_that_does_nothing_is_zero():
    # Mock network: predicts the label iff site 0 has >= 4 bits; site 1's bits are ignored.
    labels = np.arange(12) % 3
    images = np.zeros((12, 2, 2, 1), np.float32) + labels[:, None, None, None]

    def logits_fn(x, bits):
        y = x[:, 0, 0, 0].astype(jnp.int32)
        good = jax.nn.one_hot(y, 3)
        bad = jax.nn.one_hot((y + 1) % 3, 3)
        return jnp.where((bits[:, 0] >= 4)[:, None], good, bad)

    out = analysis.site_sensitivity(logits_fn, images, labels, (2, 3, 4, 8), num_sites=2,
                                    batch_size=5)  # fmt: skip
    assert out["reference_accuracy"] == 1.0
    assert out["drop"][1] == [0.0, 0.0, 0.0, 0.0]  # the site that does nothing
    assert out["drop"][0] == [100.0, 100.0, 0.0, 0.0]
    assert out["lowest_drop"] == [100.0, 0.0]


# ----------------------------------------------------------------- pairs, corruptions, stage C
def test_predict_pair_and_clean_corruption_rows_match_stage_c(fake_run):
    run_dir, ds = fake_run
    pairs = {"detrimental": analysis.load_pair(run_dir, "detrimental")}
    rows = analysis.evaluate_corruptions(
        pairs, ds.test, ds, names=["gaussian_noise"], severities=(0, 3), batch_size=16
    )
    for mode, (model, pol) in pairs.items():
        ref = evaluation.evaluate_pair(model, pol, ds.test, ds, batch_size=16, num_random=1)
        clean = [r for r in rows if r["corruption"] == "clean" and r["pair"] == mode][0]
        assert clean["fp_accuracy"] == pytest.approx(ref["fp_accuracy"])
        assert clean["dptq_accuracy"] == pytest.approx(ref["dptq_accuracy"])
        assert clean["flip_rate"] == pytest.approx(ref["flip_rate"])
        # Severity 0 of a corruption is the clean evaluation, allocation included.
        zero = [r for r in rows if r["corruption"] == "gaussian_noise" and r["severity"] == 0
                and r["pair"] == mode][0]  # fmt: skip
        assert zero["dptq_accuracy"] == clean["dptq_accuracy"]
        assert zero["allocation_change_rate"] == 0.0
        images = data.normalize(ds.test.images, ds.mean, ds.std)
        out = analysis.predict_pair(model, pol, images, batch_size=16)
        assert out["bit_idx"].shape == (len(ds.test), 4)
        hist = analysis.bit_histogram(out["bit_idx"], len(CHOICES))
        np.testing.assert_allclose(hist, ref["site_bit_histogram"], atol=1e-6)
    assert {r["severity"] for r in rows} == {0, 3}


def test_assess_pair_on_a_tiny_run(fake_run):
    run_dir, ds = fake_run
    a = analysis.assess_pair(run_dir, "detrimental", dataset=ds, batch_size=16)
    p = a["per_input"]
    assert p["bits"].shape == (len(ds.test), 4)
    np.testing.assert_array_equal(p["bits"].mean(1), 4.0)  # the budget holds per input
    assert a["fp_accuracy"] == pytest.approx(p["fp_correct"].mean())
    assert a["transitory"]["overall"]["flip"] == pytest.approx(
        a["fp_accuracy"] - a["dptq_accuracy"] + p["fixed"].mean()
    )
    lw = a["layerwise"]
    np.testing.assert_allclose(np.sum(lw["bit_histogram"], 1), 1.0)
    assert np.shape(lw["class_mean_bits"]) == (10, 4)
    sens = lw["sensitivity"]
    assert np.shape(sens["accuracy"]) == (4, len(CHOICES))
    # Every site at the highest choice is the reference itself: zero drop in the last column.
    np.testing.assert_allclose(np.asarray(sens["drop"])[:, -1], 0.0)
    assert sum(a["transitory"]["by_margin"]["count"]) == len(ds.test)


# ------------------------------------------------------------------------------- statistics
def test_mean_ci_is_the_student_t_interval():
    s = analysis.mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302652729911275; std = 1.
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["half_width"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert s["low"] == pytest.approx(2.0 - s["half_width"])
    s = analysis.mean_ci([10.0, 12.0], confidence=0.9)  # t_{0.95, 1} = 6.313751514675043
    assert s["half_width"] == pytest.approx(6.313751514675043 * math.sqrt(2) / math.sqrt(2))
    one = analysis.mean_ci([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["half_width"])
    assert analysis.mean_ci([1.0, float("nan"), 3.0])["n"] == 2


def test_aggregate_seeds_over_headline_numbers():
    results = {f"seed_{s}": fake_results(s) for s in range(3)}
    agg = analysis.aggregate_seeds(results)
    names = [name for name, _, _ in analysis.HEADLINE]
    assert set(agg["metrics"]) == set(names) and agg["seeds"] == list(results)
    m = agg["metrics"]["detrimental_dptq_acc"]
    assert m["values"] == pytest.approx({"seed_0": 10.0, "seed_1": 11.0, "seed_2": 12.0})
    assert m["mean"] == pytest.approx(11.0) and m["unit"] == "%"
    assert m["half_width"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert agg["metrics"]["max_fp_gap"]["mean"] == pytest.approx(0.4)
    # A one-mode run gives NaN for the missing pair rather than failing.
    partial = fake_results(0)
    del partial["pairs"]["robust"]
    assert math.isnan(analysis.headline_numbers(partial)["robust_drop"])
    assert list(itertools.islice(names, 2)) == ["teacher_acc", "student_acc"]
