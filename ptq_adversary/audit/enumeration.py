"""Exhaustive enumeration: every allocation on every example, prefix-shared.

Allocations that share a prefix of site bits share the computation up to that prefix: the
program is cut before every site's quantizer (:meth:`transform.QuantizedFn.run_segments`), and
the values live at a cut depend only on the bits of the sites before it. The allocations are
grouped into a prefix tree over those cuts (:func:`prefix_tree`, one level per stage:
:func:`stage_sites`); consecutive levels that add no sharing run in one call
(:func:`segments`), and the tree's segments with their rows' bits on the device make the plan
(:func:`plan`) that :func:`exhaustive` runs level by level (:func:`grouped_level` on the CPU,
vmapped rows elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import backend, data
from ptq_adversary.audit import evaluate
from ptq_adversary.models import batch_branches, quantized_program, split_model

__all__ = [
    "PrefixLevel",
    "Segment",
    "exhaustive",
    "grouped_level",
    "plan",
    "prefix_tree",
    "segments",
    "stage_sites",
]


@dataclasses.dataclass(frozen=True)
class PrefixLevel:
    """One stage of the prefix tree of a set of allocations.

    Attributes:
      parent: int ``[U]``: for each distinct prefix ending at this stage, the index of its
        parent prefix (ending at the previous stage).
      bits: int ``[U, k]``: the bits of this stage's ``k`` sites for each prefix.
    """

    parent: np.ndarray
    bits: np.ndarray


def prefix_tree(
    allocations: np.ndarray, stage_sites: Sequence[int]
) -> tuple[list[PrefixLevel], np.ndarray]:
    """Groups allocations by shared prefixes at stage boundaries.

    Args:
      allocations: int ``[N, L]`` bit-widths.
      stage_sites: number of sites of each stage, summing to ``L``.

    Returns:
      ``(levels, order)``: one :class:`PrefixLevel` per stage, and int ``[N]`` mapping each
      allocation to its row among the last level's prefixes (the full allocations).
    """
    allocations = np.asarray(allocations)
    if sum(stage_sites) != allocations.shape[1]:
        raise ValueError(
            f"stages cover {sum(stage_sites)} sites, allocations have {allocations.shape[1]}"
        )
    levels = []
    prev_index = np.zeros(len(allocations), np.int64)  # row of each allocation's prefix
    start = 0
    for k in stage_sites:
        end = start + k
        # Distinct (parent prefix, this stage's bits) pairs; parents are already distinct.
        keys = np.concatenate([prev_index[:, None], allocations[:, start:end]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        levels.append(
            PrefixLevel(parent=uniq[:, 0].astype(np.int32), bits=uniq[:, 1:].astype(np.int32))
        )
        prev_index = inverse.reshape(-1)
        start = end
    return levels, prev_index.astype(np.int32)


def stage_sites(model: nnx.Module) -> list[int]:
    """Sites per stage of the program's cuts: none before the first site, then one each.

    Returns:
      ``[0, 1, ..., 1]``: ``L + 1`` stages for a model of ``L`` sites (the ``stage_sites`` of
      :func:`prefix_tree`).
    """
    return [0] + [1] * model.num_sites


def _segment(graphdef, stages, params, rest, h, bits):
    """Applies the program's segments ``stages`` (consecutive indices) to ``h``.

    ``h``: the images ``[B, ...]`` for segment 0, else the tuple of values live at the cut
    (see :meth:`transform.QuantizedFn.run_segments`). ``bits``: one int ``[k_s]`` per stage
    (``k_0 = 0``, else 1), the same for every example.
    """
    qfn, state = quantized_program(graphdef, params, rest)
    site_bits = jnp.zeros((qfn.num_sites,), jnp.int32)
    for index, bits_k in zip(stages, bits, strict=True):
        if index > 0:  # segment s >= 1 starts with site s - 1's quantizer
            site_bits = site_bits.at[index - 1].set(bits_k[0])
    return qfn.run_segments(state, h, site_bits, stages[0], stages[-1])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _segment_group(graphdef, stages, branches, params, rest, hs, bits):
    """:func:`_segment` on a tuple of ``G`` prefixes as independent branches of one program.

    ``hs``: ``G`` values live at the cut (each ``[B, ...]`` leaves); ``bits``: ``G`` tuples of
    per-stage bits. Each prefix's batch is further cut into ``branches`` batch branches (see
    :func:`~ptq_adversary.models.batch_branches`).
    """
    out = []
    for h, b in zip(hs, bits, strict=True):
        seg = lambda h, b=b: _segment(graphdef, stages, params, rest, h, b)
        out.append(batch_branches(seg, branches, h))
    return tuple(out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _segment_rows(graphdef, stages, params, rest, h_rb, bits):
    """:func:`_segment` vmapped over ``R`` prefixes: ``h`` leaves ``[R, B, ...]``, bits stacked."""
    fn = lambda h, b: _segment(graphdef, stages, params, rest, h, b)
    return jax.vmap(fn)(h_rb, bits)


def segments(levels: Sequence[PrefixLevel]) -> list[tuple[int, ...]]:
    """Consecutive levels joined where a level maps its parents one to one.

    A level whose every parent has exactly one child adds no sharing; running it in the same
    call as its parent level saves a round trip of the activations (for an exact budget the
    last site's bits follow from the others, so the head always joins the last conv).

    Returns:
      The level indices of each segment, e.g. ``[(0, 1), (2,), (3,), (4,)]``.
    """
    segs = [[0]]
    for i in range(1, len(levels)):
        n = len(levels[i].parent)
        if n == len(levels[i - 1].parent) and np.array_equal(levels[i].parent, np.arange(n)):
            segs[-1].append(i)
        else:
            segs.append([i])
    return [tuple(seg) for seg in segs]


@dataclasses.dataclass(frozen=True)
class Segment:
    """One call level of the enumeration: stages ``stages`` applied to ``R`` rows.

    Attributes:
      stages: consecutive stage indices (see :func:`segments`).
      parent: int ``[R]``: each row's parent among the previous segment's rows (1:1 below the
        segment's first level, so that level's parents).
      bits: ``R`` tuples of per-stage bits, int ``[k_s]`` device arrays.
    """

    stages: tuple[int, ...]
    parent: np.ndarray
    bits: list[tuple[jax.Array, ...]]


def plan(levels: Sequence[PrefixLevel]) -> list[Segment]:
    """The segments of a prefix tree with their rows' bits on the device (built once)."""
    out = []
    for seg in segments(levels):
        parent = levels[seg[0]].parent
        bits = [tuple(jnp.asarray(levels[i].bits[r]) for i in seg) for r in range(len(parent))]
        out.append(Segment(seg, parent, bits))
    return out


def grouped_level(graphdef, params, rest, segment: Segment, h: list) -> list:
    """One segment's rows, ``backend.ROW_BRANCHES`` prefixes per call (``row_chunk == 1``).

    Args:
      graphdef, params, rest: the split model.
      segment: a :class:`Segment` of ``R`` rows.
      h: the previous segment's activations, one ``[B, ...]`` (a pytree of them) per row.

    Returns:
      This segment's activations, one per row (``R``). The last group is padded with its last
      row, so every call of a segment runs the same program.
    """
    rows_total = len(segment.bits)
    g = backend.row_branches(rows_total)
    branches = backend.inference_branches(jax.tree.leaves(h[0])[0].shape[0]) if g == 1 else 1
    out = []
    for r0 in range(0, rows_total, g):
        rows = [min(r, rows_total - 1) for r in range(r0, r0 + g)]
        res = _segment_group(graphdef, segment.stages, branches, params, rest,
                             tuple(h[segment.parent[i]] for i in rows),
                             tuple(segment.bits[i] for i in rows))  # fmt: skip
        out.extend(res[: rows_total - r0])
    return out


@jax.jit
def _losses(logits_nbc, labels):
    return jax.vmap(lambda lg: evaluate.loss_and_correct(lg, labels))(logits_nbc)


def exhaustive(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    allocations: ArrayLike,
    *,
    prefix_sharing: bool = True,
    example_chunk: int = 256,
    row_chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluates every allocation on every example (network frozen, inference mode).

    The allocations are grouped into a prefix tree (:func:`prefix_tree`) over the program's
    cuts (:meth:`transform.QuantizedFn.run_segments`: segment 0 runs up to the first site's
    quantizer, segment ``s`` from site ``s - 1``'s quantizer to site ``s``'s), and the tree is
    computed level by level: level ``s`` applies segment ``s`` once per distinct prefix of the
    bits up to it, to its parent prefix's live values. For the default ``cnn`` at choices
    {2,3,4,5,6,8} and budget 4 that is 1, 6, 31, 109 and 109 segment applications instead of
    109 full forward passes; levels that map their parents one to one (here the head, whose
    bits the exact budget fixes) run in the same call as the level above (:func:`segments`).

    Args:
      model: a :class:`~ptq_adversary.models.QuantizedModel` (see
        :func:`~ptq_adversary.models.as_quantized_model` for any other network).
      images: float ``[B, H, W, C]``, as the model expects them (normalized).
      labels: int ``[B]``.
      allocations: int ``[N, L]`` bit-widths (the same allocation for every example).
      prefix_sharing: share the work of common prefixes. ``False`` runs the same segment calls
        with every allocation computing every segment: the naive per-allocation reference,
        bit-identical in its results (tested).
      example_chunk: examples per call (memory: a level holds its prefixes' live values for
        this many examples). The last chunk is padded.
      row_chunk: prefixes per call within a level (vmapped); ``None``: 1 on CPU, 16 elsewhere.

    Returns:
      ``(loss, correct)``: float32 and bool numpy ``[N, B]``.
    """
    graphdef, params, rest = split_model(model)
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    allocations = np.asarray(allocations, np.int32)
    row_chunk = row_chunk or backend.default_row_chunk()
    sites = stage_sites(model)
    if prefix_sharing:
        levels, order = prefix_tree(allocations, sites)
    else:  # the same stages, every allocation its own row at every level: no sharing
        n, ends = len(allocations), np.cumsum([0, *sites])
        levels = [
            PrefixLevel(
                np.arange(n, dtype=np.int32) if i else np.zeros(n, np.int32),
                allocations[:, ends[i] : ends[i + 1]],
            )
            for i in range(len(sites))
        ]
        order = np.arange(n, dtype=np.int32)

    segs = plan(levels)

    def run(x, y):
        h = [x]  # live values [B, ...] per row of the previous segment; root: the images
        stack = lambda *a: jnp.stack(a)
        for segment in segs:
            if row_chunk == 1:
                h = grouped_level(graphdef, params, rest, segment, h)
                continue
            out = []
            for r0 in range(0, len(segment.bits), row_chunk):
                parents = segment.parent[r0 : r0 + row_chunk]
                h_in = jax.tree.map(stack, *[h[p] for p in parents])
                b_in = jax.tree.map(stack, *segment.bits[r0 : r0 + row_chunk])
                res = _segment_rows(graphdef, segment.stages, params, rest, h_in, b_in)
                out.extend(jax.tree.map(lambda a, r=r: a[r], res) for r in range(len(parents)))
            h = out
        return _losses(jnp.stack([h[i] for i in order]), y)

    return _chunked_over_examples(run, images, labels, example_chunk)


def _chunked_over_examples(run, images, labels, chunk):
    images, labels = np.asarray(images), np.asarray(labels)
    chunk = max(1, min(chunk, images.shape[0]))
    losses, corrects = [], []
    for start, stop, pad in data.padded_batches(images.shape[0], chunk):
        x, y = (data.pad_rows(a[start:stop], pad) for a in (images, labels))
        loss, correct = run(x, y)
        losses.append(np.asarray(loss)[:, : stop - start])
        corrects.append(np.asarray(correct)[:, : stop - start])
    return np.concatenate(losses, axis=1), np.concatenate(corrects, axis=1)
