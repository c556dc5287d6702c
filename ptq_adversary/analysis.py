"""Assessment of trained network/policy pairs: where and why DPTQ fails, and how surely.

Three groups of pure functions and one loader that strings them together:

* **Transitory points** (:func:`transitory_points`, :func:`binned_rates`, :func:`class_rates`,
  :func:`flip_concentration`): per test input, the FP prediction, margin and confidence and
  whether the pair's greedy DPTQ allocation flips it, then flip rates per FP-margin decile and
  per class, and how much of the damage sits on low-margin inputs.
* **Layer-wise** (:func:`bit_histogram`, :func:`class_mean_bits`, :func:`allocation_summary`,
  :func:`site_sensitivity`): which bits each policy gives each site, how that depends on the
  input, and how much accuracy each site costs alone at low precision (budget ignored).
* **Shift** (:func:`evaluate_corruptions`): FP and greedy-DPTQ accuracy of several pairs under
  every corruption of :mod:`ptq_adversary.corruptions` and severity.
* **Statistics over seeds** (:func:`mean_ci`, :func:`headline_numbers`, :func:`aggregate_seeds`).

:func:`assess_pair` loads a pair of a pipeline workdir (``DIR/<mode>/best/``) and returns all of
the per-pair analyses as plain dicts of floats, lists and numpy arrays. Forward passes go
through the functional API (:func:`models.apply_model`, :func:`policy.greedy`), jitted once per
architecture and batch shape.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import artifacts, corruptions, data, models, policy

__all__ = [
    "load_pair",
    "load_run_dataset",
    "pair_forward",
    "predict_pair",
    "transitory_points",
    "rank_bins",
    "binned_rates",
    "class_rates",
    "flip_concentration",
    "transitory_summary",
    "bit_histogram",
    "class_mean_bits",
    "allocation_summary",
    "sensitivity_allocations",
    "allocation_accuracy",
    "site_sensitivity",
    "assess_pair",
    "evaluate_corruptions",
    "mean_ci",
    "HEADLINE",
    "headline_numbers",
    "aggregate_seeds",
]


# ------------------------------------------------------------------------------- loading
def load_pair(run_dir: str, mode: str) -> tuple[artifacts.LoadedModel, artifacts.LoadedPolicy]:
    """The selected network and policy of pair ``mode`` in pipeline workdir ``run_dir``.

    Reads ``run_dir/<mode>/best/model`` and ``run_dir/<mode>/best/policy`` (written by
    ``trainers.policy_aware``).
    """
    best = os.path.join(run_dir, mode, "best")
    return (
        artifacts.load_model(os.path.join(best, "model")),
        artifacts.load_policy(os.path.join(best, "policy")),
    )


def load_run_dataset(run_dir: str) -> data.Dataset:
    """The dataset a pipeline workdir was trained and evaluated on (its ``config.json``)."""
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)["data"]
    return data.load_dataset(
        cfg["name"],
        data_dir=cfg.get("data_dir"),
        val_size=cfg["val_size"],
        split_seed=cfg["split_seed"],
        train_limit=cfg.get("train_limit"),
        test_limit=cfg.get("test_limit"),
    )


# ------------------------------------------------------------------------------- forward
@functools.partial(jax.jit, static_argnames=("graphdef", "policy_graphdef", "budget"))
def pair_forward(
    params: nnx.State,
    rest: nnx.State,
    policy_params: nnx.State,
    policy_rest: nnx.State,
    images: ArrayLike,
    *,
    graphdef: nnx.GraphDef,
    policy_graphdef: nnx.GraphDef,
    budget: policy.Budget,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FP logits, greedy-DPTQ logits and the greedy allocation of a pair on one batch.

    Args:
      params, rest: the network's state; policy_params, policy_rest: the policy's.
      images: float32 ``[B, H, W, C]``, normalised.
      graphdef, policy_graphdef, budget: static structure (one compile per architecture).

    Returns:
      ``fp_logits [B, C]``, ``q_logits [B, C]`` (at the policy's greedy allocation) and
      int32 ``bit_idx [B, L]`` (indices into ``budget.choices``).
    """
    fp_logits, _ = models.apply_model(graphdef, params, rest, images)
    bit_idx = policy.greedy_allocation(
        policy_graphdef, policy_params, policy_rest, images=images, budget=budget
    )
    q_logits, _ = models.apply_model(
        graphdef, params, rest, images, policy.to_bits(bit_idx, budget)
    )
    return fp_logits, q_logits, bit_idx


def predict_pair(
    model: artifacts.LoadedModel,
    pol: artifacts.LoadedPolicy,
    images: np.ndarray,
    *,
    batch_size: int = 1000,
) -> dict[str, np.ndarray]:
    """Per-input outputs of a pair on normalised images.

    Args:
      model, pol: the pair.
      images: float32 ``[N, H, W, C]``, normalised like the training data.
      batch_size: fixed batch size (the last batch is padded, so one compile).

    Returns:
      numpy ``fp_logits [N, C]``, ``q_logits [N, C]``, int32 ``bit_idx [N, L]``.
    """
    forward = functools.partial(
        pair_forward,
        graphdef=model.graphdef,
        policy_graphdef=pol.graphdef,
        budget=pol.spec.budget_spec,
    )
    outs: list[tuple[np.ndarray, ...]] = []
    for start, stop, pad in data.padded_batches(len(images), batch_size):
        batch = data.pad_rows(np.asarray(images[start:stop]), pad)
        out = forward(model.params, model.rest, pol.params, pol.rest, batch)
        outs.append(tuple(np.asarray(o)[: stop - start] for o in out))
    fp, q, idx = (np.concatenate(parts) for parts in zip(*outs, strict=True))
    return {"fp_logits": fp, "q_logits": q, "bit_idx": idx.astype(np.int32)}


# ---------------------------------------------------------------------- transitory points
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
        ranks = _average_ranks(margin)
        u = ranks[flip].sum() - k * (k + 1) / 2  # pairs with flipped margin > kept margin
        out["auroc"] = float(1.0 - u / (k * (n - k)))
    else:
        out["auroc"] = math.nan
    out["median_margin_flipped"] = float(np.median(margin[flip])) if k else math.nan
    out["median_margin_kept"] = float(np.median(margin[~flip])) if k < n else math.nan
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
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


# ---------------------------------------------------------------------------- layer-wise
def bit_histogram(bit_idx: ArrayLike, num_choices: int) -> np.ndarray:
    """Fraction of inputs giving each site each choice.

    Args:
      bit_idx: int ``[N, L]`` choice indices.
      num_choices: K.

    Returns:
      float64 ``[L, K]``, rows sum to 1.
    """
    bit_idx = np.asarray(bit_idx)
    counts = np.stack([np.bincount(col, minlength=num_choices) for col in bit_idx.T])
    return counts / max(len(bit_idx), 1)


def class_mean_bits(bits: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Mean bit-width per true class and site (how the allocation depends on the input).

    Args:
      bits: int ``[N, L]`` bit-widths.
      labels: int ``[N]``.
      num_classes: C.

    Returns:
      float64 ``[C, L]`` (NaN rows for empty classes).
    """
    bits = np.asarray(bits, np.float64)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.stack(
        [np.bincount(labels, weights=col, minlength=num_classes) for col in bits.T], axis=1
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))  # max: no -0.0 for a single outcome


def allocation_summary(
    bit_idx: ArrayLike, labels: ArrayLike, choices: Sequence[int]
) -> dict[str, Any]:
    """How many distinct allocations a policy uses and how much they depend on the class.

    Args:
      bit_idx: int ``[N, L]`` greedy allocations (choice indices).
      labels: int ``[N]``.
      choices: the K bit-widths.

    Returns:
      ``num_distinct``; ``modal_bits`` (the most frequent allocation, in bits) and
      ``modal_share``; ``top`` (up to 5 most frequent allocations as ``{"bits", "share"}``);
      ``entropy_bits`` H(allocation); ``class_mutual_information_bits`` I(class; allocation)
      and ``class_information_fraction`` = I / H (0: the allocation says nothing about the
      class; 1: it is a function of the class).
    """
    bit_idx = np.asarray(bit_idx)
    labels = np.asarray(labels)
    uniq, inverse, counts = np.unique(bit_idx, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(-counts, kind="stable")
    choices_arr = np.asarray(choices)
    h_alloc = _entropy_bits(counts)
    joint = np.zeros((len(uniq), int(labels.max()) + 1 if len(labels) else 1))
    np.add.at(joint, (inverse, labels), 1)
    h_class = _entropy_bits(joint.sum(0))
    mi = h_alloc + h_class - _entropy_bits(joint.reshape(-1))
    return {
        "num_distinct": int(len(uniq)),
        "modal_bits": choices_arr[uniq[order[0]]].tolist(),
        "modal_share": float(counts[order[0]] / counts.sum()),
        "top": [
            {"bits": choices_arr[uniq[i]].tolist(), "share": float(counts[i] / counts.sum())}
            for i in order[:5]
        ],
        "entropy_bits": h_alloc,
        "class_mutual_information_bits": float(max(mi, 0.0)),
        "class_information_fraction": float(max(mi, 0.0) / h_alloc) if h_alloc > 0 else 0.0,
    }


def sensitivity_allocations(choices: Sequence[int], num_sites: int) -> np.ndarray:
    """The allocations of the one-site-at-a-time probe (the budget is ignored on purpose).

    Args:
      choices: the K bit-widths (sorted).
      num_sites: L.

    Returns:
      int32 bits ``[1 + L * K, L]``: row 0 puts every site at the highest choice; row
      ``1 + l * K + k`` puts site ``l`` at ``choices[k]`` and the others at the highest.
    """
    high = max(choices)
    rows = [np.full(num_sites, high)]
    for site in range(num_sites):
        for c in choices:
            row = np.full(num_sites, high)
            row[site] = c
            rows.append(row)
    return np.asarray(rows, np.int32)


def allocation_accuracy(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    images: np.ndarray,
    labels: np.ndarray,
    bits: ArrayLike,
    *,
    batch_size: int = 1000,
) -> np.ndarray:
    """Accuracy of a network under each of P fixed allocations (the same for every input).

    Args:
      logits_fn: ``logits_fn(images [B, H, W, C], bits [B, L] int32) -> logits [B, C]``,
        e.g. ``lambda x, b: models.apply_model(graphdef, params, rest, x, b)[0]``.
      images: float32 ``[N, H, W, C]`` normalised.
      labels: int ``[N]``.
      bits: int ``[P, L]``.
      batch_size: inputs per call; the P allocations run one after another
        (``jax.lax.map``) so memory stays at one batch.

    Returns:
      float64 ``[P]`` accuracies in [0, 1].
    """
    bits = jnp.asarray(bits, jnp.int32)

    @jax.jit
    def correct(x, y, mask):
        def one(bits_l):
            b = jnp.broadcast_to(bits_l, (x.shape[0], bits_l.shape[0]))
            return jnp.sum((jnp.argmax(logits_fn(x, b), -1) == y) * mask)

        return jax.lax.map(one, bits)

    total = np.zeros(bits.shape[0], np.float64)
    for start, stop, pad in data.padded_batches(len(images), batch_size):
        mask = data.pad_rows(np.ones(stop - start, np.float32), pad)
        total += np.asarray(
            correct(
                data.pad_rows(np.asarray(images[start:stop]), pad),
                data.pad_rows(np.asarray(labels[start:stop], np.int32), pad),
                mask,
            )
        )
    return total / len(images)


def site_sensitivity(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    images: np.ndarray,
    labels: np.ndarray,
    choices: Sequence[int],
    num_sites: int,
    *,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """One-site-at-a-time sensitivity: site l at each choice, every other site at the highest.

    Args:
      logits_fn: as in :func:`allocation_accuracy`.
      images: float32 ``[N, H, W, C]`` normalised; labels: int ``[N]``.
      choices: the K bit-widths; num_sites: L.
      batch_size: inputs per call.

    Returns:
      ``reference_accuracy`` (all sites at the highest choice), ``accuracy`` ``[L][K]``
      (site l at ``choices[k]``), ``drop`` ``[L][K]`` in points
      (``100 * (reference - accuracy)``), and ``lowest_drop`` ``[L]``, the drop with site l at
      the lowest choice: the headline sensitivity.
    """
    k = len(choices)
    acc = allocation_accuracy(
        logits_fn,
        images,
        labels,
        sensitivity_allocations(choices, num_sites),
        batch_size=batch_size,
    )
    reference, grid = float(acc[0]), acc[1:].reshape(num_sites, k)
    drop = 100.0 * (reference - grid)
    return {
        "reference_bits": int(max(choices)),
        "reference_accuracy": reference,
        "accuracy": grid.tolist(),
        "drop": drop.tolist(),
        "lowest_bits": int(min(choices)),
        "lowest_drop": drop[:, int(np.argmin(choices))].tolist(),
    }


def assess_pair(
    run_dir: str,
    mode: str,
    *,
    dataset: data.Dataset | None = None,
    batch_size: int = 1000,
    num_bins: int = 10,
    sensitivity: bool = True,
) -> dict[str, Any]:
    """Transitory-point and layer-wise analyses of one pair on the test split.

    Args:
      run_dir: a pipeline workdir with ``<mode>/best/`` (and ``config.json`` unless
        ``dataset`` is given).
      mode: ``'robust'`` or ``'detrimental'``.
      dataset: the data (default: :func:`load_run_dataset`).
      batch_size: evaluation batch size.
      num_bins: margin/confidence bins (10: deciles).
      sensitivity: run the one-site-at-a-time probe (``1 + L * K`` passes over the test set).

    Returns:
      ``mode``, ``site_names``, ``choices``, ``class_names``, ``num_examples``,
      ``fp_accuracy``, ``dptq_accuracy``; ``per_input`` (numpy arrays: ``labels [N]``,
      ``bit_idx [N, L]``, ``bits [N, L]`` and the :func:`transitory_points` arrays);
      ``transitory`` (:func:`transitory_summary`); ``layerwise``: ``bit_histogram [L][K]``,
      ``class_mean_bits [C][L]``, ``site_mean_bits [L]``, ``allocation``
      (:func:`allocation_summary`) and ``sensitivity`` (:func:`site_sensitivity`, or None).
    """
    dataset = dataset if dataset is not None else load_run_dataset(run_dir)
    model, pol = load_pair(run_dir, mode)
    budget = pol.spec.budget_spec
    images = data.normalize(dataset.test.images, dataset.mean, dataset.std)
    labels = dataset.test.labels
    out = predict_pair(model, pol, images, batch_size=batch_size)
    points = {
        k: np.asarray(v)
        for k, v in transitory_points(out["fp_logits"], out["q_logits"], labels).items()
    }
    bits = np.asarray(policy.to_bits(out["bit_idx"], budget))
    sens = None
    if sensitivity:
        logits_fn = lambda x, b: models.apply_model(model.graphdef, model.params, model.rest, x, b)[
            0
        ]
        sens = site_sensitivity(
            logits_fn, images, labels, budget.choices, model.num_sites, batch_size=batch_size
        )
    return {
        "mode": mode,
        "site_names": list(model.site_names),
        "choices": list(budget.choices),
        "class_names": list(dataset.class_names),
        "num_examples": int(len(labels)),
        "fp_accuracy": float(points["fp_correct"].mean()),
        "dptq_accuracy": float(points["q_correct"].mean()),
        "per_input": {"labels": labels, "bit_idx": out["bit_idx"], "bits": bits, **points},
        "transitory": transitory_summary(points, labels, dataset.num_classes, num_bins),
        "layerwise": {
            "bit_histogram": bit_histogram(out["bit_idx"], budget.num_choices).tolist(),
            "class_mean_bits": class_mean_bits(bits, labels, dataset.num_classes).tolist(),
            "site_mean_bits": bits.mean(0).tolist(),
            "allocation": allocation_summary(out["bit_idx"], labels, budget.choices),
            "sensitivity": sens,
        },
    }


# ----------------------------------------------------------------------------------- shift
def _corrupt_fn(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    return jax.jit(lambda key, x, severity: corruptions.apply(name, key, x, severity))


def evaluate_corruptions(
    pairs: Mapping[str, tuple[artifacts.LoadedModel, artifacts.LoadedPolicy]],
    split: data.Split,
    stats: data.DatasetStats | data.Dataset,
    *,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    batch_size: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """FP and greedy-DPTQ accuracy of each pair under each corruption and severity.

    Every image is corrupted on the ``[0, 1]`` pixel scale, then normalised exactly as
    :func:`data.normalize` does (severity 0, the clean row, reproduces stage C's inputs bit for
    bit). The policy sees the corrupted image too, so its allocation may change. Batch ``i`` of
    corruption ``c`` uses the key ``fold_in(fold_in(PRNGKey(seed), c), i)`` at every severity
    (common random numbers: a higher severity scales the same noise), and all pairs see the
    same corrupted images.

    Args:
      pairs: name -> (model, policy).
      split: the examples (uint8 images); stats: normalisation mean/std.
      names: corruptions to run (default: all of :data:`corruptions.CORRUPTIONS`).
      severities: severities per corruption; the clean row (``corruption='clean'``,
        severity 0) is always evaluated once.
      batch_size: inputs per call.
      seed: base of the corruption keys.
      progress: called with a short line after each condition (e.g. ``print``).

    Returns:
      One row per (corruption, severity, pair): ``corruption``, ``family``, ``severity``,
      ``param``, ``unit``, ``pair``, ``fp_accuracy``, ``dptq_accuracy``, ``drop`` (points),
      ``flip_rate`` (FP right, DPTQ wrong, over all inputs), ``allocation_change_rate``
      (inputs whose greedy allocation differs from their clean one), ``mean_bits``.
    """
    names = tuple(names) if names is not None else corruptions.names()
    mean, std = np.asarray(stats.mean, np.float32), np.asarray(stats.std, np.float32)
    raw = split.images.astype(np.float32) / np.float32(255.0)  # exact: x * 255 == pixel
    labels = split.labels
    n = len(labels)

    def run(corrupt) -> dict[str, dict[str, np.ndarray]]:
        outs: dict[str, list] = {p: [] for p in pairs}
        for i, (start, stop, pad) in enumerate(data.padded_batches(n, batch_size)):
            x = data.pad_rows(raw[start:stop], pad)
            x = np.asarray(corrupt(i, x)) if corrupt is not None else x
            x = data.normalize(x * np.float32(255.0), mean, std)
            for p, (model, pol) in pairs.items():
                o = pair_forward(
                    model.params,
                    model.rest,
                    pol.params,
                    pol.rest,
                    x,
                    graphdef=model.graphdef,
                    policy_graphdef=pol.graphdef,
                    budget=pol.spec.budget_spec,
                )
                outs[p].append(tuple(np.asarray(a)[: stop - start] for a in o))
        return {
            p: dict(
                zip(
                    ("fp", "q", "idx"),
                    (np.concatenate(c) for c in zip(*o, strict=True)),
                    strict=True,
                )
            )
            for p, o in outs.items()
        }

    rows: list[dict[str, Any]] = []

    def add_rows(name, family, severity, param, unit, result, clean):
        for p, (_, pol) in pairs.items():
            r = result[p]
            fp_right = r["fp"].argmax(-1) == labels
            q_right = r["q"].argmax(-1) == labels
            rows.append(
                {
                    "corruption": name,
                    "family": family,
                    "severity": int(severity),
                    "param": param,
                    "unit": unit,
                    "pair": p,
                    "fp_accuracy": float(fp_right.mean()),
                    "dptq_accuracy": float(q_right.mean()),
                    "drop": float(100.0 * (fp_right.mean() - q_right.mean())),
                    "flip_rate": float((fp_right & ~q_right).mean()),
                    "allocation_change_rate": float(np.any(r["idx"] != clean[p]["idx"], -1).mean()),
                    "mean_bits": float(
                        np.asarray(
                            policy.to_bits(r["idx"], pol.spec.budget_spec), np.float64
                        ).mean()
                    ),
                }
            )

    clean = run(None)
    add_rows("clean", "clean", 0, 0.0, "", clean, clean)
    if progress:
        progress(f"clean: {len(rows)} rows")
    for c_index, name in enumerate(names):
        c = corruptions.CORRUPTIONS[name]
        corrupt_fn = _corrupt_fn(name)
        base = jax.random.fold_in(jax.random.PRNGKey(seed), c_index)
        for severity in severities:
            result = run(
                lambda i, x, s=severity, f=corrupt_fn, k=base: f(
                    jax.random.fold_in(k, i), x, jnp.int32(s)
                )
            )
            param = float(c.params[severity - 1]) if severity > 0 else 0.0
            add_rows(name, c.family, severity, param, c.unit, result, clean)
            if progress:
                accs = ", ".join(
                    f"{r['pair']} FP {r['fp_accuracy']:.3f} DPTQ {r['dptq_accuracy']:.3f}"
                    for r in rows[-len(pairs) :]
                )
                progress(f"{name} s{severity}: {accs}")
    return rows


# ---------------------------------------------------------------------- seeds and statistics
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
    from scipy import stats as scipy_stats  # scipy comes with jax

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
