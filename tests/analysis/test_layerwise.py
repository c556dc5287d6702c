"""Layer-wise analyses: bit histograms, class dependence, allocation summary, sensitivity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import analysis
from tests.analysis.fakes import CHOICES


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


def test_entropy_bits_by_hand():
    assert analysis.entropy_bits(np.array([1, 1, 2])) == pytest.approx(1.5)
    assert analysis.entropy_bits(np.array([0, 4, 0])) == 0.0  # one outcome: 0, not -0
    assert analysis.entropy_bits(np.ones((2, 4))) == pytest.approx(3.0)  # flattened, uniform


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


def test_site_sensitivity_reports_progress_per_batch():
    labels = np.arange(12) % 3
    images = np.zeros((12, 2, 2, 1), np.float32)
    done = []
    analysis.site_sensitivity(lambda x, b: jnp.zeros((x.shape[0], 3)), images, labels, (2, 8),
                              num_sites=2, batch_size=5, advance=done.append)  # fmt: skip
    assert done == pytest.approx([5 / 12, 5 / 12, 2 / 12])  # the padded last batch counts 2
