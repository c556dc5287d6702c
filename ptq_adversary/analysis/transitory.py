"""Transitory points: which inputs DPTQ flips, and how that depends on the FP margin.

Per test input, :func:`transitory_points` gives the FP prediction, margin and confidence and
whether the pair's greedy DPTQ allocation flips it; :func:`binned_rates` and
:func:`class_rates` turn boolean indicators into rates per FP-margin decile and per class;
:func:`flip_concentration` measures how much of the damage sits on low-margin inputs; and
:func:`transitory_summary` strings these together for one pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "transitory_points",
    "rank_bins",
    "binned_rates",
    "class_rates",
    "flip_concentration",
    "average_ranks",
    "transitory_summary",
]


@jax.jit
def transitory_points(
    fp_logits: ArrayLike, q_logits: ArrayLike, labels: ArrayLike
) -> dict[str, jax.Array]:
    """Per-input FP margin and confidence and what DPTQ does to the prediction.

    Args:
      fp_logits: float ``[N, C]`` full-precision logits.
      q_logits: float ``[N, C]`` logits under the pair's DPTQ allocation.
      labels: int ``[N]``.

    Returns:
      ``[N]`` arrays: ``fp_pred``, ``q_pred`` (int32); ``fp_correct``, ``q_correct``,
      ``flip`` (FP right and DPTQ wrong), ``changed`` (the predicted class changes),
      ``fixed`` (FP wrong and DPTQ right) (bool); ``fp_margin`` (top-1 minus top-2 FP logit,
      >= 0, label-free), ``fp_label_margin`` (true-class logit minus the largest other one;
      > 0 iff FP is right), ``fp_confidence`` (largest FP softmax probability) (float32).
    """
    fp_logits = jnp.asarray(fp_logits, jnp.float32)
    q_logits = jnp.asarray(q_logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    fp_pred = jnp.argmax(fp_logits, -1).astype(jnp.int32)
    q_pred = jnp.argmax(q_logits, -1).astype(jnp.int32)
    top2 = jax.lax.top_k(fp_logits, 2)[0]
    true_logit = jnp.take_along_axis(fp_logits, labels[:, None], -1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, fp_logits.shape[-1], dtype=bool), -jnp.inf, fp_logits)
    fp_correct = fp_pred == labels
    q_correct = q_pred == labels
    return {
        "fp_pred": fp_pred,
        "q_pred": q_pred,
        "fp_correct": fp_correct,
        "q_correct": q_correct,
        "flip": fp_correct & ~q_correct,
        "changed": fp_pred != q_pred,
        "fixed": ~fp_correct & q_correct,
        "fp_margin": top2[:, 0] - top2[:, 1],
        "fp_label_margin": true_logit - jnp.max(others, -1),
        "fp_confidence": jnp.max(jax.nn.softmax(fp_logits, -1), -1),
    }


def rank_bins(values: ArrayLike, num_bins: int) -> np.ndarray:
    """Equal-count bins by rank: bin 0 holds the smallest values.

    Ties are broken by position (stable sort), so every bin has ``N // num_bins`` or one more
    inputs whatever the ties.

    Args:
      values: float ``[N]``.
      num_bins: number of bins (10 for deciles).

    Returns:
      int32 ``[N]`` bin index per input, in ``[0, num_bins)``.
    """
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.int64)
    ranks[order] = np.arange(len(values))
    return (ranks * num_bins // max(len(values), 1)).astype(np.int32)


def binned_rates(
    values: ArrayLike, indicators: Mapping[str, ArrayLike], num_bins: int = 10
) -> dict[str, list]:
    """Rates of boolean indicators per equal-count bin of ``values`` (e.g. FP-margin deciles).

    Args:
      values: float ``[N]`` (bins by rank, :func:`rank_bins`).
      indicators: name -> bool ``[N]``.
      num_bins: number of bins.

    Returns:
      ``bin`` (1-based), ``low``/``high`` (the smallest and largest value in the bin),
      ``count`` and, per indicator, its rate in the bin (``[num_bins]`` lists of floats).
    """
    values = np.asarray(values, np.float64)
    bins = rank_bins(values, num_bins)
    out: dict[str, list] = {"bin": list(range(1, num_bins + 1)), "low": [], "high": [], "count": []}
    rates = {name: [] for name in indicators}
    for b in range(num_bins):
        inside = bins == b
        n = int(inside.sum())
        out["count"].append(n)
        out["low"].append(float(values[inside].min()) if n else math.nan)
        out["high"].append(float(values[inside].max()) if n else math.nan)
        for name, ind in indicators.items():
            rates[name].append(float(np.asarray(ind)[inside].mean()) if n else math.nan)
    return {**out, **rates}


def class_rates(
    labels: ArrayLike, indicators: Mapping[str, ArrayLike], num_classes: int
) -> dict[str, list]:
    """Rates of boolean indicators per true class.

    Args:
      labels: int ``[N]``.
      indicators: name -> bool ``[N]``.
      num_classes: C.

    Returns:
      ``class`` (0..C-1), ``count`` and, per indicator, its rate within the class (``[C]``
      lists; NaN for an empty class).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    out: dict[str, list] = {"class": list(range(num_classes)), "count": counts.tolist()}
    for name, ind in indicators.items():
        hits = np.bincount(labels, weights=np.asarray(ind, np.float64), minlength=num_classes)
        out[name] = [float(h / c) if c else math.nan for h, c in zip(hits, counts, strict=True)]
    return out


def flip_concentration(
    margin: ArrayLike, flip: ArrayLike, eligible: ArrayLike | None = None
) -> dict[str, float]:
    """How concentrated flips are on low-margin inputs.

    Args:
      margin: float ``[N]`` FP margin.
      flip: bool ``[N]``.
      eligible: bool ``[N]``, the inputs that can flip (e.g. the FP-correct ones for
        right-to-wrong flips); default all.

    Returns:
      among eligible inputs: ``num_eligible``, ``num_flips``, ``flip_rate``;
      ``share_lowest_{10,20,50}``: fraction of the flips among the 10/20/50 % lowest-margin
      inputs (1/10, 1/5, 1/2 if flips ignored the margin); ``lift_lowest_10``: flip rate of the
      lowest decile over the overall rate; ``auroc``: probability that a flipped input has a
      lower margin than an unflipped one (ties count 1/2; 0.5 = margin says nothing, NaN if no
      flips or no unflipped inputs); ``median_margin_flipped``/``_kept``.
    """
    margin = np.asarray(margin, np.float64)
    flip = np.asarray(flip, bool)
    if eligible is not None:
        keep = np.asarray(eligible, bool)
        margin, flip = margin[keep], flip[keep]
    n, k = len(margin), int(flip.sum())
    out: dict[str, float] = {
        "num_eligible": n,
        "num_flips": k,
        "flip_rate": k / n if n else math.nan,
    }
    order = np.argsort(margin, kind="stable")
    for q in (10, 20, 50):
        lowest = order[: int(round(n * q / 100))]
        out[f"share_lowest_{q}"] = float(flip[lowest].sum() / k) if k else math.nan
    lowest10 = order[: int(round(n / 10))]
    rate10 = float(flip[lowest10].mean()) if len(lowest10) else math.nan
    out["lift_lowest_10"] = rate10 / out["flip_rate"] if k else math.nan
    # Mann-Whitney U with average ranks (ties 1/2): P(margin_flipped < margin_kept).
    if 0 < k < n:
        ranks = average_ranks(margin)
        u = ranks[flip].sum() - k * (k + 1) / 2  # pairs with flipped margin > kept margin
        out["auroc"] = float(1.0 - u / (k * (n - k)))
    else:
        out["auroc"] = math.nan
    out["median_margin_flipped"] = float(np.median(margin[flip])) if k else math.nan
    out["median_margin_kept"] = float(np.median(margin[~flip])) if k < n else math.nan
    return out


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as in the Mann-Whitney U statistic).

    Args:
      x: float ``[N]``.

    Returns:
      float64 ``[N]``: the rank of each value in ascending order (1 = smallest); tied values
      all get the mean of the ranks they span, e.g. ``[5, 1, 5] -> [2.5, 1, 2.5]``.
    """
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of start+1 .. stop
        start = stop
    return ranks


def transitory_summary(
    points: Mapping[str, ArrayLike], labels: ArrayLike, num_classes: int, num_bins: int = 10
) -> dict[str, Any]:
    """Flip rates per FP-margin and FP-confidence bin and per class, and the concentration.

    Args:
      points: the output of :func:`transitory_points` for ``N`` inputs.
      labels: int ``[N]``.
      num_classes: C.
      num_bins: bins of the margin and confidence (10: deciles, bin 1 = lowest).

    Returns:
      ``overall`` (rates over all inputs), ``by_margin`` and ``by_confidence``
      (:func:`binned_rates` of ``flip``, ``changed``, ``fp_correct``, ``q_correct``),
      ``by_class`` (:func:`class_rates`), ``prediction_share`` (``fp``/``q``: ``[C]``
      fraction of all inputs predicted as each class; a collapse under DPTQ shows as one
      class taking most of ``q``), ``dominant_class`` (the class DPTQ predicts most often)
      and ``dominant_share``, and ``concentration``: :func:`flip_concentration` of
      right-to-wrong flips among FP-correct inputs against ``fp_label_margin`` (``flips``),
      the same among FP-correct inputs whose true class is not the dominant one
      (``flips_outside_dominant``: separates "which inputs fail" from "everything collapses
      onto one class", whose own inputs cannot flip), and of any prediction change among all
      inputs against ``fp_margin`` (``changes``).
    """
    p = {k: np.asarray(v) for k, v in points.items()}
    ind = {k: p[k] for k in ("flip", "changed", "fp_correct", "q_correct")}
    n = max(len(p["fp_pred"]), 1)
    q_share = np.bincount(p["q_pred"], minlength=num_classes) / n
    dominant = int(np.argmax(q_share))
    outside = p["fp_correct"] & (np.asarray(labels) != dominant)
    return {
        "overall": {k: float(v.mean()) for k, v in {**ind, "fixed": p["fixed"]}.items()},
        "by_margin": binned_rates(p["fp_margin"], ind, num_bins),
        "by_confidence": binned_rates(p["fp_confidence"], ind, num_bins),
        "by_class": class_rates(labels, ind, num_classes),
        "prediction_share": {
            k: (np.bincount(p[f"{k}_pred"], minlength=num_classes) / n).tolist()
            for k in ("fp", "q")
        },
        "dominant_class": dominant,
        "dominant_share": float(q_share[dominant]),
        "concentration": {
            "flips": flip_concentration(p["fp_label_margin"], p["flip"], p["fp_correct"]),
            "flips_outside_dominant": flip_concentration(p["fp_label_margin"], p["flip"], outside),
            "changes": flip_concentration(p["fp_margin"], p["changed"]),
        },
    }
