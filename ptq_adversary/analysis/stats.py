"""Statistics over seeds: mean and Student-t interval of every headline number.

:func:`mean_ci` is the interval; :data:`HEADLINE` names the headline numbers of a pipeline
``results.json`` and how to read them; :func:`headline_numbers` reads them from one run and
:func:`aggregate_seeds` pools them over runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats  # scipy comes with jax

__all__ = ["mean_ci", "HEADLINE", "headline_numbers", "aggregate_seeds"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and a two-sided Student-t confidence interval (n - 1 degrees of freedom).

    Args:
      values: the per-seed values (n >= 1; NaNs are dropped).
      confidence: coverage of the interval.

    Returns:
      ``n``, ``mean``, ``std`` (sample, ddof 1), ``half_width``
      (``t_{(1+confidence)/2, n-1} * std / sqrt(n)``), ``low``, ``high``; the width is NaN for
      n < 2.
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    n = len(x)
    if n == 0:
        return {
            "n": 0,
            "mean": math.nan,
            "std": math.nan,
            "half_width": math.nan,
            "low": math.nan,
            "high": math.nan,
        }
    mean = float(x.mean())
    if n < 2:
        std = half = math.nan
    else:
        std = float(x.std(ddof=1))
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "half_width": half,
        "low": mean - half,
        "high": mean + half,
    }


#: (name, unit, how to read it from a pipeline ``results.json``) for every headline number.
HEADLINE: tuple[tuple[str, str, Callable[[dict], float]], ...] = (
    ("teacher_acc", "%", lambda r: 100 * r["teacher"]["test_accuracy"]),
    ("student_acc", "%", lambda r: 100 * r["student"]["test_accuracy"]),
    *(
        item
        for mode in ("robust", "detrimental")
        for item in (
            (f"{mode}_fp_acc", "%", lambda r, m=mode: 100 * r["pairs"][m]["fp_accuracy"]),
            (f"{mode}_dptq_acc", "%", lambda r, m=mode: 100 * r["pairs"][m]["dptq_accuracy"]),
            (f"{mode}_drop", "pts", lambda r, m=mode: r["pairs"][m]["drop"]),
            (f"{mode}_uniform_drop", "pts", lambda r, m=mode: r["pairs"][m]["uniform_drop"]),
            (f"{mode}_random_drop", "pts", lambda r, m=mode: r["pairs"][m]["random_drop"]),
            (f"{mode}_flip_rate", "%", lambda r, m=mode: 100 * r["pairs"][m]["flip_rate"]),
        )
    ),
    ("max_fp_gap", "pts", lambda r: r["max_fp_gap_points"]),
)


def headline_numbers(results: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of one pipeline ``results.json`` (see :data:`HEADLINE`).

    A pair missing from ``results`` (a one-mode run) gives NaN for its numbers.
    """
    out = {}
    for name, _, get in HEADLINE:
        try:
            out[name] = float(get(results))
        except KeyError:
            out[name] = math.nan
    return out


def aggregate_seeds(
    results_by_seed: Mapping[str, Mapping[str, Any]], confidence: float = 0.95
) -> dict[str, Any]:
    """Mean and t-interval of every headline number over seeds.

    Args:
      results_by_seed: seed name -> pipeline ``results.json`` dict.
      confidence: interval coverage.

    Returns:
      ``seeds`` (names), ``confidence`` and ``metrics``: name -> :func:`mean_ci` plus ``unit``
      and ``values`` (seed name -> value).
    """
    per_seed = {s: headline_numbers(r) for s, r in results_by_seed.items()}
    metrics = {}
    for name, unit, _ in HEADLINE:
        values = {s: v[name] for s, v in per_seed.items()}
        metrics[name] = {
            "unit": unit,
            **mean_ci(list(values.values()), confidence),
            "values": values,
        }
    return {"seeds": list(results_by_seed), "confidence": confidence, "metrics": metrics}
