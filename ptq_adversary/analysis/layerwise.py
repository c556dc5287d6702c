"""Layer-wise analyses: which bits each policy gives each site, and what each site costs.

:func:`bit_histogram`, :func:`class_mean_bits` and :func:`allocation_summary` describe the
greedy allocations of a policy (per site, per class, how many distinct ones and how much they
depend on the class); :func:`site_sensitivity` measures how much accuracy each site costs alone
at low precision (budget ignored), through :func:`allocation_accuracy` over the fixed
allocations of :func:`sensitivity_allocations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ptq_adversary import data

__all__ = [
    "bit_histogram",
    "class_mean_bits",
    "entropy_bits",
    "allocation_summary",
    "sensitivity_allocations",
    "allocation_accuracy",
    "site_sensitivity",
]


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


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy, in bits, of the distribution given by outcome counts.

    Args:
      counts: non-negative ``[M]`` (any shape; flattened) counts of M outcomes, not all zero.

    Returns:
      ``H = -sum p log2 p`` over the outcomes with ``p = counts / counts.sum()`` (>= 0; 0.0 for
      a single outcome).
    """
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
    h_alloc = entropy_bits(counts)
    joint = np.zeros((len(uniq), int(labels.max()) + 1 if len(labels) else 1))
    np.add.at(joint, (inverse, labels), 1)
    h_class = entropy_bits(joint.sum(0))
    mi = h_alloc + h_class - entropy_bits(joint.reshape(-1))
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
    advance: Callable[[float], None] | None = None,
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
      advance: progress, called after each batch with the fraction of the ``N`` inputs done
        in it (the calls sum to 1).

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
        if advance is not None:
            advance((stop - start) / len(images))
    return total / len(images)


def site_sensitivity(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    images: np.ndarray,
    labels: np.ndarray,
    choices: Sequence[int],
    num_sites: int,
    *,
    batch_size: int = 1000,
    advance: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """One-site-at-a-time sensitivity: site l at each choice, every other site at the highest.

    Args:
      logits_fn: as in :func:`allocation_accuracy`.
      images: float32 ``[N, H, W, C]`` normalised; labels: int ``[N]``.
      choices: the K bit-widths; num_sites: L.
      batch_size: inputs per call.
      advance: progress, as in :func:`allocation_accuracy`.

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
        advance=advance,
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
