"""assess_pair end to end on a tiny fake run."""

import numpy as np
import pytest

from ptq_adversary import analysis
from tests.analysis.fakes import CHOICES


def test_assess_pair_on_a_tiny_run(fake_run):
    run_dir, ds = fake_run
    done = []
    a = analysis.assess_pair(run_dir, "detrimental", dataset=ds, batch_size=16, advance=done.append)
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
    # Progress: one call per batch of the prediction and of the probe (40 images, batches of
    # 16: 3 each), summing to the whole pair; the probe's 1 + L * K = 25 passes outweigh the
    # prediction's PREDICTION_PASSES.
    assert len(done) == 6 and sum(done) == pytest.approx(1.0)
    prediction = analysis.PREDICTION_PASSES / (analysis.PREDICTION_PASSES + 1 + 4 * len(CHOICES))
    assert sum(done[:3]) == pytest.approx(prediction)
    assert done[:3] == pytest.approx([prediction * 16 / 40] * 2 + [prediction * 8 / 40])
