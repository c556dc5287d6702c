"""The cached per-run analyses: what assess_run writes, its progress, and reuse."""

import os

import numpy as np
import pytest

from ptq_adversary import report
from tests.analysis.fakes import make_fake_run, tiny_dataset


def test_assess_run_caches_and_reports_progress(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run_dir)
    make_fake_run(run_dir, seed=0)
    done = []
    result = report.assess_run(run_dir, out, dataset=tiny_dataset(n_test=20), batch_size=16,
                               sensitivity=False, advance=done.append)  # fmt: skip
    assert list(result["pairs"]) == ["robust", "detrimental"]
    assert result["pairs"]["robust"]["layerwise"]["sensitivity"] is None
    # Two pairs, each half of the run, each two batches of the prediction (16 + 4 images).
    assert done == pytest.approx([0.5 * 16 / 20, 0.5 * 4 / 20] * 2)
    with np.load(os.path.join(out, "per_input_detrimental.npz")) as per_input:
        assert per_input["bits"].shape == (20, 4)
    # The cache is reused: nothing recomputed (no dataset needed), no progress reported.
    again = report.assess_run(run_dir, out, advance=done.append)
    assert again == result and len(done) == 4
