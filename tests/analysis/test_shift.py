"""A pair's outputs and the corruption evaluation against stage C's own evaluator."""

import numpy as np
import pytest

from ptq_adversary import analysis, data, evaluation
from tests.analysis.fakes import CHOICES


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
