"""Statistics over seeds: the Student-t interval and the headline numbers."""

import itertools
import math

import pytest

from ptq_adversary import analysis
from tests.analysis.fakes import fake_results


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
