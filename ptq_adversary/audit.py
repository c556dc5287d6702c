r"""Audit any trained model: how badly can dynamic PTQ at a bit budget hurt it, and where?

The network is frozen. For a model, images, labels and a budget (choices, mean bits per site),
the audit evaluates budget-feasible per-example bit allocations found by several methods:

``uniform``
  the one allocation a static deployment would use (:func:`policy.uniform_allocation`).
``random``
  allocations drawn uniformly from all feasible ones: the accuracy under one random draw, and
  *random search* (the worst of ``E`` draws per example) as the baseline every search must beat.
``greedy`` / ``beam``
  per-example local search maximising the quantized cross-entropy: from the uniform
  allocation, repeatedly move bits between two sites (exact sum kept) and keep the ``W`` best
  allocations (``W = 1`` greedy). Works for any number of sites.
``policy``
  the pipeline's input-conditioned policy (:class:`~ptq_adversary.policy.PolicyNet`)
  trained by REINFORCE against the frozen network: the damage a *deployable* policy (a function
  of the input) achieves, as opposed to a per-example oracle.
``certify``
  branch and bound over the allocations (:func:`ptq_adversary.certify.certify`): per example a
  proof that no feasible allocation misclassifies it (sound interval bounds through the rest of
  the program prune whole subtrees), or a misclassifying allocation (the other methods' finds
  are tried first), or, past its node or time limit, neither. Its ``certified_accuracy`` is a
  lower bound of the worst-case accuracy and its ``accuracy`` an upper one: the bracket, exact
  when they meet. Works at any number of sites; it only gets slower.
``exhaustive``
  every feasible allocation for every example when there are at most ``max_allocations``: the
  exact per-example worst case (the oracle). Allocations that share a prefix of site bits share
  the computation up to that prefix: the program is cut before every site's quantizer
  (:meth:`transform.QuantizedFn.run_segments`), and the values live at a cut depend only on
  the bits of the sites before it.

Entry point: :func:`audit` returns an :class:`AuditResult`; :func:`write_report` writes it as
JSON, CSV, a markdown summary and PNG plots. ``configs/audit.py`` runs it from the command line
on a checkpoint of a pipeline workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import backend, data, io, metrics, plotting, policy, steps
from ptq_adversary import certify as certify_lib
from ptq_adversary.models import (
    QuantizedModel,
    apply_model,
    as_quantized_model,
    batch_branches,
    check_program,
    quantized_program,
    split_model,
)
from ptq_adversary.policy import PolicyNet, greedy_allocation, low_bit_starts

__all__ = [
    "METHODS",
    "AuditResult",
    "SearchResult",
    "audit",
    "beam_search",
    "exhaustive",
    "prefix_tree",
    "random_search",
]

METHODS = ("uniform", "random", "greedy", "beam", "policy", "exhaustive", "certify")


# ----------------------------------------------------------------------------- evaluation
def _loss_and_correct(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, jnp.argmax(logits, -1) == labels


@functools.partial(jax.jit, static_argnums=(0,))
def _fp_eval(graphdef, params, rest, images, labels):
    logits, _ = apply_model(graphdef, params, rest, images)
    loss, correct = _loss_and_correct(logits, labels)
    top2 = jax.lax.top_k(logits, 2)[0]
    true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    other = jnp.where(jnp.argmax(logits, -1) == labels, top2[:, 1], top2[:, 0])
    return loss, correct, true - other


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_per_example(graphdef, params, rest, images, labels, bits_cbl):
    """Quantized loss and correctness of ``C`` per-example allocations ``bits [C, B, L]``."""

    def one(bits_bl):
        logits, _ = apply_model(graphdef, params, rest, images, bits_bl)
        return _loss_and_correct(logits, labels)

    return jax.vmap(one)(bits_cbl)


# ------------------------------------------------------------------ exhaustive enumeration
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


def _stage_sites(model: nnx.Module) -> list[int]:
    """Sites per stage of the program's cuts: none before the first site, then one each."""
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


def _segments(levels: Sequence[PrefixLevel]) -> list[tuple[int, ...]]:
    """Consecutive levels joined where a level maps its parents one to one.

    A level whose every parent has exactly one child adds no sharing; running it in the same
    call as its parent level saves a round trip of the activations (for an exact budget the
    last site's bits follow from the others, so the head always joins the last conv).
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
class _Segment:
    """One call level of the enumeration: stages ``stages`` applied to ``R`` rows.

    Attributes:
      stages: consecutive stage indices (see :func:`_segments`).
      parent: int ``[R]``: each row's parent among the previous segment's rows (1:1 below the
        segment's first level, so that level's parents).
      bits: ``R`` tuples of per-stage bits, int ``[k_s]`` device arrays.
    """

    stages: tuple[int, ...]
    parent: np.ndarray
    bits: list[tuple[jax.Array, ...]]


def _plan(levels: Sequence[PrefixLevel]) -> list[_Segment]:
    """The segments of a prefix tree with their rows' bits on the device (built once)."""
    plan = []
    for seg in _segments(levels):
        parent = levels[seg[0]].parent
        bits = [tuple(jnp.asarray(levels[i].bits[r]) for i in seg) for r in range(len(parent))]
        plan.append(_Segment(seg, parent, bits))
    return plan


def _grouped_level(graphdef, params, rest, segment: _Segment, h: list) -> list:
    """One segment's rows, ``backend.ROW_BRANCHES`` prefixes per call (``row_chunk == 1``).

    ``h``: the previous segment's activations, one ``[B, ...]`` per row. Returns this
    segment's, one per row. The last group is padded with its last row, so every call of a
    segment runs the same program.
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


@functools.partial(jax.jit, static_argnums=(0,))
def _model_call(graphdef, params, rest, images, bits_l):
    """The whole model under one allocation ``bits [L]`` for every example: logits."""
    bits = jnp.broadcast_to(bits_l, (images.shape[0], bits_l.shape[0]))
    return apply_model(graphdef, params, rest, images, bits)[0]


@jax.jit
def _losses(logits_nbc, labels):
    return jax.vmap(lambda lg: _loss_and_correct(lg, labels))(logits_nbc)


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
    bits the exact budget fixes) run in the same call as the level above (:func:`_segments`).

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
    sites = _stage_sites(model)
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

    plan = _plan(levels)

    def run(x, y):
        h = [x]  # live values [B, ...] per row of the previous segment; root: the images
        stack = lambda *a: jnp.stack(a)
        for segment in plan:
            if row_chunk == 1:
                h = _grouped_level(graphdef, params, rest, segment, h)
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


# --------------------------------------------------------------------- per-example searches
@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a per-example search found (numpy arrays; ``B`` examples, ``L`` sites).

    Attributes:
      worst_loss: float32 ``[B]``, the largest quantized cross-entropy found.
      worst_bits: int32 ``[B, L]``, the allocation that reached it.
      broken: bool ``[B]``, whether some evaluated allocation misclassified the example.
      broken_bits: int32 ``[B, L]``, the highest-loss misclassifying allocation found
        (``worst_bits`` where none was found).
      mean_correct: float32 ``[B]``, the fraction of evaluated allocations that classified the
        example correctly (for random search: the accuracy under one random draw).
      evaluations: forward passes per example.
    """

    worst_loss: np.ndarray
    worst_bits: np.ndarray
    broken: np.ndarray
    broken_bits: np.ndarray
    mean_correct: np.ndarray
    evaluations: int


class _Tracker:
    """Running worst case per example over batches of evaluated allocations."""

    def __init__(self, batch: int, num_sites: int):
        self.worst_loss = np.full(batch, -np.inf, np.float32)
        self.worst_bits = np.zeros((batch, num_sites), np.int32)
        self.broken_loss = np.full(batch, -np.inf, np.float32)
        self.broken_bits = np.zeros((batch, num_sites), np.int32)
        self.correct_sum = np.zeros(batch, np.float64)
        self.count = 0

    def update(self, loss: np.ndarray, correct: np.ndarray, bits: np.ndarray) -> None:
        """Adds ``C`` evaluated allocations: loss, correct ``[C, B]``, bits ``[C, B, L]``."""
        cols = np.arange(loss.shape[1])
        best = np.argmax(loss, axis=0)
        better = loss[best, cols] > self.worst_loss
        self.worst_loss = np.where(better, loss[best, cols], self.worst_loss)
        self.worst_bits = np.where(better[:, None], bits[best, cols], self.worst_bits)
        wrong_loss = np.where(correct, -np.inf, loss)
        best = np.argmax(wrong_loss, axis=0)
        better = wrong_loss[best, cols] > self.broken_loss
        self.broken_loss = np.where(better, wrong_loss[best, cols], self.broken_loss)
        self.broken_bits = np.where(better[:, None], bits[best, cols], self.broken_bits)
        self.correct_sum += correct.sum(axis=0)
        self.count += loss.shape[0]

    def result(self) -> SearchResult:
        broken = np.isfinite(self.broken_loss)
        return SearchResult(
            worst_loss=self.worst_loss,
            worst_bits=self.worst_bits,
            broken=broken,
            broken_bits=np.where(broken[:, None], self.broken_bits, self.worst_bits),
            mean_correct=(self.correct_sum / max(self.count, 1)).astype(np.float32),
            evaluations=self.count,
        )


def _as_model(model, images, params, weight_bits, quantize_first) -> QuantizedModel:
    """The audited network as a :class:`QuantizedModel` described at the images' shape."""
    shape = np.shape(images)[1:]
    if isinstance(model, QuantizedModel):
        if params is not None:
            raise TypeError("params= goes with a function; a QuantizedModel carries its state")
        if model.input_shape == tuple(shape):
            return model
        weight_bits, quantize_first, model = model.weight_bits, model.quantize_first, model.net
    return as_quantized_model(
        model,
        input_shape=shape,
        params=params,
        weight_bits=weight_bits,
        quantize_first=quantize_first,
    )


def _num_classes(model: nnx.Module, images: np.ndarray) -> int:
    """The model's number of classes, from its FP forward pass on one image (shapes only).

    Raises:
      ValueError: the model rejects images of this shape (a wrong channel count or size),
        with the model's own error as the cause.
    """
    graphdef, params, rest = split_model(model)
    one = jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    try:  # the pure FP forward of the audit itself (_fp_eval): nothing is mutated
        out = jax.eval_shape(lambda x: apply_model(graphdef, params, rest, x)[0], one)
    except Exception as err:  # noqa: BLE001 (any failure here is the input's shape)
        raise ValueError(
            f"the model rejected images of shape {tuple(images.shape)} (per example "
            f"{tuple(images.shape[1:])}: check the channel count and image size the model "
            f"was built for): {err}"
        ) from err
    return int(out.shape[-1])


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def _check_inputs(images: ArrayLike, labels: ArrayLike):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one example, got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [B] = [{images.shape[0]}], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        # A cast would truncate float labels (2.7 -> class 2) without a word.
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be float (normalized as the model expects), got {images.dtype}"
        )
    data.check_finite_images(images)
    return images.astype(np.float32), labels.astype(np.int32)


def random_search(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    budget: policy.Budget,
    *,
    num_samples: int,
    seed: int = 0,
    example_chunk: int = 64,
    alloc_chunk: int = 16,
) -> SearchResult:
    """Evaluates ``num_samples`` allocations per example drawn uniformly from all feasible ones.

    Args:
      model: a model with the ``bits`` interface.
      images: float ``[B, H, W, C]`` (normalized); labels: int ``[B]``.
      budget: the :class:`policy.Budget` (``num_sites`` must be the model's).
      num_samples: ``E``, draws per example (independent across examples).
      seed: PRNG seed of the draws.
      example_chunk, alloc_chunk: examples and allocations per compiled call.

    Returns:
      A :class:`SearchResult`; ``mean_correct`` is the accuracy under one random draw.
    """
    graphdef, params, rest = split_model(model)
    images, labels = _check_inputs(images, labels)
    draw = jax.jit(jax.vmap(jax.vmap(lambda k: policy.sample_uniform(k, budget))))
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(images), example_chunk):
        x = jnp.asarray(images[start : start + example_chunk])
        y = jnp.asarray(labels[start : start + example_chunk])
        tracker = _Tracker(len(x), budget.num_sites)
        for c0 in range(0, num_samples, alloc_chunk):
            c = min(alloc_chunk, num_samples - c0)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
                (start * num_samples + c0 * len(x)) + jnp.arange(c * len(x))
            ).reshape(c, len(x))
            bits = policy.to_bits(draw(keys), budget)  # [c, B, L]
            loss, correct = _eval_per_example(graphdef, params, rest, x, y, bits)
            tracker.update(np.asarray(loss), np.asarray(correct), np.asarray(bits))
        out.append(tracker.result())
    return _concat(out)


def _concat(parts: Sequence[SearchResult]) -> SearchResult:
    fields = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(SearchResult)
        if f.name != "evaluations"
    }
    return SearchResult(**fields, evaluations=parts[0].evaluations)


def _moves(budget: policy.Budget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ``(i, j, k)`` moves: site ``i`` takes choice ``k``, site ``j`` keeps the sum."""
    L, K = budget.num_sites, budget.num_choices
    i, j, k = np.meshgrid(np.arange(L), np.arange(L), np.arange(K), indexing="ij")
    keep = i != j
    return i[keep].astype(np.int32), j[keep].astype(np.int32), k[keep].astype(np.int32)


def _neighbours(key, idx_wbl, budget: policy.Budget, num_moves: int):
    """``num_moves`` random feasible neighbours of each allocation ``[W, B, L]`` (indices).

    A neighbour moves site ``i`` to another choice and site ``j`` to the choice that keeps the
    exact bit sum. Where fewer moves are feasible, the rest repeat the allocation itself.

    Returns:
      int32 ``[W * num_moves, B, L]`` choice indices.
    """
    mi, mj, mk = _moves(budget)
    real = np.arange(max(num_moves, len(mi))) < len(mi)  # pad with never-feasible moves
    mi, mj, mk = (
        jnp.asarray(np.resize(a, len(real)) if len(a) else np.zeros(len(real), np.int32))
        for a in (mi, mj, mk)
    )
    choices = jnp.asarray(budget.choices, jnp.int32)
    # value -> choice index (or -1) for values 0 .. 2 * max.
    table = -jnp.ones(2 * budget.choices[-1] + 1, jnp.int32)
    table = table.at[choices].set(jnp.arange(budget.num_choices, dtype=jnp.int32))
    vals = choices[idx_wbl]  # [W, B, L]
    vi, vj = vals[..., mi], vals[..., mj]  # [W, B, T]
    new_j = vi + vj - choices[mk]
    new_j_idx = jnp.where(
        (new_j >= 0) & (new_j < table.shape[0]), table[jnp.clip(new_j, 0, table.shape[0] - 1)], -1
    )
    feasible = (new_j_idx >= 0) & (mk != idx_wbl[..., mi]) & jnp.asarray(real)
    gumbel = jax.random.gumbel(key, feasible.shape)
    score = jnp.where(feasible, gumbel, -jnp.inf)
    top_score, top = jax.lax.top_k(score, num_moves)  # [W, B, M]
    ok = jnp.isfinite(top_score)
    t_i, t_j, t_k = mi[top], mj[top], mk[top]
    t_jk = jnp.take_along_axis(new_j_idx, top, -1)
    L = budget.num_sites
    site = jnp.arange(L)
    cand = jnp.broadcast_to(idx_wbl[:, :, None, :], (*top.shape, L))
    cand = jnp.where((site == t_i[..., None]) & ok[..., None], t_k[..., None], cand)
    cand = jnp.where((site == t_j[..., None]) & ok[..., None], t_jk[..., None], cand)
    w, b, m, _ = cand.shape
    return jnp.transpose(cand, (0, 2, 1, 3)).reshape(w * m, b, L)


def _select(pool_idx, pool_loss, width: int):
    """Top-``width`` distinct allocations per example: pool ``[S, B, L]``, loss ``[S, B]``."""
    same = jnp.all(pool_idx[:, None] == pool_idx[None, :], axis=-1)  # [S, S, B]
    earlier = jnp.tril(jnp.ones(same.shape[:2], bool), k=-1)[..., None]
    dup = jnp.any(same & earlier, axis=1)  # [S, B]: equals an earlier pool entry
    score = jnp.where(dup, -jnp.inf, pool_loss)
    top_loss, top = jax.lax.top_k(score.T, width)  # [B, W]
    idx = jnp.take_along_axis(jnp.transpose(pool_idx, (1, 0, 2)), top[..., None], axis=1)
    return jnp.transpose(idx, (1, 0, 2)), top_loss.T


def beam_search(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    budget: policy.Budget,
    *,
    width: int = 4,
    num_moves: int = 8,
    num_iters: int = 4,
    num_init: int = 0,
    low_starts: bool = False,
    seed: int = 0,
    example_chunk: int = 64,
) -> SearchResult:
    """Per-example beam search over feasible allocations, maximising the quantized loss.

    Starts from the uniform allocation. Each iteration draws ``num_moves`` random feasible
    moves (:func:`_neighbours`) from each of the ``width`` allocations in the beam, evaluates
    them, and keeps the ``width`` best distinct allocations among beam and candidates.
    ``width=1`` is greedy hill climbing. With ``num_init``, the first beam is the best of the
    uniform allocation and ``num_init`` random feasible ones (random restarts: on a model with
    few sites the damaging allocations can be far from uniform). With ``low_starts`` the first
    beam also competes with the :func:`low_bit_starts` (each site alone at the lowest choice).
    Cost: ``1 + num_init + S + num_iters * width * num_moves`` forward passes per example
    (``S = len(low_bit_starts(budget))`` with ``low_starts``, else 0).

    Args:
      model: a model with the ``bits`` interface.
      images: float ``[B, H, W, C]`` (normalized); labels: int ``[B]``.
      budget: the :class:`policy.Budget`.
      width: ``W``, allocations kept per example.
      num_moves: ``M``, candidates drawn per beam entry and iteration.
      num_iters: iterations.
      num_init: random feasible allocations evaluated to seed the beam.
      low_starts: also seed the beam with :func:`low_bit_starts`.
      seed: PRNG seed of the move and initial draws.
      example_chunk: examples per compiled call.

    Returns:
      A :class:`SearchResult` over every evaluated allocation.
    """
    graphdef, params, rest = split_model(model)
    images, labels = _check_inputs(images, labels)
    uniform = jnp.asarray(policy.uniform_allocation(budget), jnp.int32)
    starts = low_bit_starts(budget) if low_starts else np.zeros((0, budget.num_sites))
    starts = jnp.asarray(starts, jnp.int32)
    key = jax.random.key(seed)
    draw = jax.jit(jax.vmap(jax.vmap(lambda k: policy.sample_uniform(k, budget))))

    @jax.jit
    def iterate(key, beam_idx, beam_loss, x, y):
        cand = _neighbours(key, beam_idx, budget, num_moves)  # [W*M, B, L]
        bits = policy.to_bits(cand, budget)
        loss, correct = _eval_per_example(graphdef, params, rest, x, y, bits)
        pool = jnp.concatenate([beam_idx, cand])
        pool_loss = jnp.concatenate([beam_loss, loss])
        new_idx, new_loss = _select(pool, pool_loss, width)
        return new_idx, new_loss, loss, correct, bits

    out = []
    for start in range(0, len(images), example_chunk):
        x = jnp.asarray(images[start : start + example_chunk])
        y = jnp.asarray(labels[start : start + example_chunk])
        batch = x.shape[0]
        tracker = _Tracker(batch, budget.num_sites)
        init_bits = jnp.broadcast_to(policy.to_bits(uniform, budget), (1, batch, len(uniform)))
        loss, correct = _eval_per_example(graphdef, params, rest, x, y, init_bits)
        tracker.update(np.asarray(loss), np.asarray(correct), np.asarray(init_bits))
        # The beam starts as `width` copies of the uniform allocation (copies are duplicates
        # and are dropped at the first selection), or as the best of uniform and `num_init`
        # random feasible allocations.
        beam_idx = jnp.broadcast_to(uniform, (width, batch, len(uniform)))
        beam_loss = jnp.concatenate([loss, jnp.full((width - 1, batch), -jnp.inf)])
        if num_init or len(starts):
            init_idx = jnp.broadcast_to(starts[:, None], (len(starts), batch, len(uniform)))
            if num_init:
                init_key = jax.random.fold_in(jax.random.fold_in(key, start), 2**31 - 1)
                keys = jax.random.split(init_key, num_init * batch)
                init_idx = jnp.concatenate([init_idx, draw(keys.reshape(num_init, batch))])
            init_bits = policy.to_bits(init_idx, budget)
            loss, correct = _eval_per_example(graphdef, params, rest, x, y, init_bits)
            tracker.update(np.asarray(loss), np.asarray(correct), np.asarray(init_bits))
            beam_idx, beam_loss = _select(
                jnp.concatenate([beam_idx, init_idx]), jnp.concatenate([beam_loss, loss]), width
            )
        for it in range(num_iters):
            k = jax.random.fold_in(jax.random.fold_in(key, start), it)
            beam_idx, beam_loss, loss, correct, bits = iterate(k, beam_idx, beam_loss, x, y)
            tracker.update(np.asarray(loss), np.asarray(correct), np.asarray(bits))
        out.append(tracker.result())
    return _concat(out)


# ---------------------------------------------------------------- learned (deployable) policy
@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """REINFORCE training of an input-conditioned policy against the frozen network.

    Attributes:
      steps: policy updates.
      batch_size: inputs per update.
      num_samples: ``P`` allocations sampled per input (leave-one-out baseline, ``P >= 2``).
      learning_rate: Adam step size.
      entropy_coef: weight of the entropy bonus.
      widths: the policy network's conv widths (:class:`~ptq_adversary.policy.PolicyNet`).
    """

    steps: int = 300
    batch_size: int = 64
    num_samples: int = 8
    learning_rate: float = 3e-3
    entropy_coef: float = 0.01
    widths: tuple[int, ...] = (8, 16)


def train_policy(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    budget: policy.Budget,
    config: PolicyConfig = PolicyConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
) -> nnx.Module:
    """Trains the pipeline's bit-width policy to maximise the frozen network's quantized loss.

    The stage-B step of the pipeline (:func:`steps.make_pair_train_step`, detrimental mode,
    reward ``CE(f_q(x; b), y)`` against the true labels) with the network's update switched off
    (``optax.set_to_zero`` and a zero quantized-loss weight): only the policy learns.

    Args:
      model: the frozen network (``bits`` interface).
      images: float ``[N, H, W, C]`` training inputs (normalized); labels: int ``[N]``.
      budget: the :class:`policy.Budget`.
      config: a :class:`PolicyConfig`.
      seed: seeds the policy's initialisation, the batch order and the sampled allocations.
      progress: show a progress bar.

    Returns:
      The trained :class:`~ptq_adversary.policy.PolicyNet`.
    """

    images, labels = _check_inputs(images, labels)
    graphdef, params, rest = split_model(model)
    pol = PolicyNet(
        num_sites=budget.num_sites,
        num_choices=budget.num_choices,
        in_channels=images.shape[-1],
        widths=config.widths,
        rngs=nnx.Rngs(seed),
    )
    pol_graphdef, pol_params, pol_rest = nnx.split(pol, nnx.Param, ...)
    frozen, pol_opt = optax.set_to_zero(), optax.adam(config.learning_rate)
    state = steps.create_pair_state(params, rest, frozen, pol_params, pol_rest, pol_opt, seed)
    step = jax.jit(
        steps.make_pair_train_step(
            graphdef,
            pol_graphdef,
            frozen,
            pol_opt,
            budget,
            mode="detrimental",
            num_samples=config.num_samples,
            temperature=1.0,
            quant_weight=0.0,
            margin=0.0,
            reward="ce",
            entropy_coef=config.entropy_coef,
        )
    )
    num_classes = _num_classes(model, np.asarray(images[:1]))
    rng = np.random.default_rng(seed)
    batch = min(config.batch_size, len(images))
    with metrics.progress_bar(config.steps, desc="audit policy", disable=not progress) as bar:
        for _ in range(config.steps):
            idx = rng.choice(len(images), batch, replace=False)
            target = jax.nn.one_hot(labels[idx], num_classes)  # argmax = the true label
            state, m = step(state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), target)
            bar.update()
    return nnx.merge(pol_graphdef, state.policy_params, state.policy_rest)


def policy_allocations(
    policy_net: nnx.Module, images: ArrayLike, budget: policy.Budget, *, chunk: int = 512
) -> np.ndarray:
    """The deployed (greedy) allocation of a policy network for each input.

    Returns:
      int32 numpy ``[B, L]`` bit-widths.
    """
    graphdef, state = nnx.split(policy_net)

    @jax.jit
    def alloc(state, x):
        idx = greedy_allocation(graphdef, state, images=x, budget=budget)
        return policy.to_bits(idx, budget)

    images = np.asarray(images, np.float32)
    return np.concatenate(
        [
            np.asarray(alloc(state, jnp.asarray(images[i : i + chunk])))
            for i in range(0, len(images), chunk)
        ]
    )


def evaluate_allocations(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    bits: ArrayLike,
    *,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantized loss and correctness of one allocation per example (``bits [B, L]``).

    Returns:
      float32 and bool numpy ``[B]``.
    """
    graphdef, params, rest = split_model(model)
    images, labels = _check_inputs(images, labels)
    bits = np.asarray(bits, np.int32)
    out = [
        _eval_per_example(
            graphdef,
            params,
            rest,
            jnp.asarray(images[i : i + chunk]),
            jnp.asarray(labels[i : i + chunk]),
            jnp.asarray(bits[None, i : i + chunk]),
        )
        for i in range(0, len(images), chunk)
    ]
    return (
        np.concatenate([np.asarray(o[0][0]) for o in out]),
        np.concatenate([np.asarray(o[1][0]) for o in out]),
    )


# --------------------------------------------------------------------------- the audit
@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's outcome on the audited examples.

    Attributes:
      accuracy: fraction of examples classified correctly under the method's allocations. For
        a search (random search, greedy, beam, exhaustive): correct under *every* allocation it
        evaluated, so exhaustive gives the exact worst-case (oracle) accuracy.
      broken: bool ``[B]``: FP-correct examples the method misclassified.
      worst_loss: float32 ``[B]``: the largest quantized cross-entropy reached.
      bits: int32 ``[B, L]``: the allocation behind it (for searches, the misclassifying one
        where there is one).
      evaluations: forward passes per example (``certify``: nodes evaluated per example, on
        average; most are partial passes).
      seconds: wall time.
      extra: method-specific headline numbers merged into :meth:`AuditResult.summary`
        (``certify``: :meth:`~ptq_adversary.certify.CertifyResult.summary`).
    """

    accuracy: float
    broken: np.ndarray
    worst_loss: np.ndarray
    bits: np.ndarray
    evaluations: int
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The audit of one model at one budget (numpy arrays over ``B`` examples, ``L`` sites).

    Attributes:
      site_names: ``L`` site names (``model.site_names`` or ``site0..``).
      choices, budget: the bit budget audited.
      num_allocations: the number of budget-feasible allocations.
      fp_accuracy: full-precision accuracy.
      fp_correct, fp_loss, fp_margin: per example; the margin is the true-class logit minus the
        best other logit (negative when FP is wrong).
      labels: int ``[B]``.
      methods: :class:`MethodResult` per method run (:data:`METHODS`; ``random`` also yields
        ``random_search``), in the order run.
      random_accuracy: expected accuracy under one random feasible allocation (if run).
      vulnerable: bool ``[B]``: FP-correct and misclassified by some allocation found by any
        method (all of them, with ``exhaustive``).
      loss_increase: float32 ``[B]``: worst quantized loss found minus FP loss.
      breaking_bits: int32 ``[B, L]``: an allocation that misclassifies the example (the
        highest-loss one found; the worst-loss allocation where none does).
      min_low_bit_sites: int ``[B]``: with ``exhaustive``, the fewest sites below the budget
        (``bits < budget``) of any misclassifying allocation; ``-1`` if none or not known.
      worst_static: with ``exhaustive``, the single allocation (same for every example) with
        the lowest accuracy: ``{"bits": [...], "accuracy": float}``.
      skipped: methods not run and why.
      notes: searches run differently from what was asked and why, by method name (a search
        whose evaluations per example reach the number of feasible allocations runs as exact
        enumeration, see :func:`audit`).
    """

    site_names: tuple[str, ...]
    choices: tuple[int, ...]
    budget: float
    num_allocations: int
    fp_accuracy: float
    fp_correct: np.ndarray
    fp_loss: np.ndarray
    fp_margin: np.ndarray
    labels: np.ndarray
    methods: dict[str, MethodResult]
    random_accuracy: float | None
    vulnerable: np.ndarray
    loss_increase: np.ndarray
    breaking_bits: np.ndarray
    min_low_bit_sites: np.ndarray
    worst_static: dict[str, Any] | None
    skipped: dict[str, str]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def ranking(self) -> np.ndarray:
        """Example indices, most vulnerable first.

        The vulnerable examples (correct in FP and broken by some method), then the robust
        ones (correct in FP, broken by none), then those already wrong in FP (nothing to
        break); each group by decreasing loss increase. See :func:`example_status`.
        """
        return np.lexsort((-self.loss_increase, _status_codes(self)))

    def summary(self) -> dict[str, Any]:
        """JSON-ready headline numbers (no per-example arrays)."""
        fp_right = self.fp_correct.astype(bool)
        return {
            "num_examples": self.num_examples,
            "site_names": list(self.site_names),
            "choices": list(self.choices),
            "budget": self.budget,
            "num_allocations": self.num_allocations,
            "fp_accuracy": self.fp_accuracy,
            "random_accuracy": self.random_accuracy,
            "methods": {
                name: {
                    "accuracy": m.accuracy,
                    "drop_points": round(100.0 * (self.fp_accuracy - m.accuracy), 4),
                    "flip_rate": float(m.broken[fp_right].mean()) if fp_right.any() else 0.0,
                    "evaluations_per_example": m.evaluations,
                    "seconds": round(m.seconds, 2),
                    **m.extra,
                }
                for name, m in self.methods.items()
            },
            "vulnerable_fraction": float(np.mean(_status_codes(self) == 0)),
            "mean_loss_increase": float(self.loss_increase.mean()),
            "worst_static": self.worst_static,
            "skipped": self.skipped,
            "notes": self.notes,
        }


#: Per-example status, in ranking order (:func:`example_status`).
STATUSES = ("vulnerable", "robust", "wrong_in_fp")


def _status_codes(result: AuditResult) -> np.ndarray:
    """Index into :data:`STATUSES` per example: int ``[B]``."""
    fp_right = np.asarray(result.fp_correct, bool)
    vulnerable = np.asarray(result.vulnerable, bool) & fp_right
    return np.where(vulnerable, 0, np.where(fp_right, 1, 2))


def example_status(result: AuditResult) -> np.ndarray:
    """Each example's status: ``"vulnerable"`` (correct in FP, misclassified by an allocation
    some method found), ``"robust"`` (correct in FP, no allocation found breaks it) or
    ``"wrong_in_fp"`` (misclassified already in full precision: nothing to break).

    Returns:
      str numpy ``[B]``.
    """
    return np.asarray(STATUSES)[_status_codes(result)]


# Strongest first: where several methods break an example, report the strongest's allocation.
_STRENGTH = ("exhaustive", "certify", "beam", "greedy", "random_search", "policy", "uniform")


def _method(tracked: SearchResult, fp_correct: np.ndarray, seconds: float) -> MethodResult:
    return MethodResult(
        accuracy=float(np.mean(~tracked.broken)),
        broken=fp_correct & tracked.broken,
        worst_loss=tracked.worst_loss,
        bits=tracked.broken_bits,
        evaluations=tracked.evaluations,
        seconds=seconds,
    )


class _Enumeration:
    """Every feasible allocation on every example (:func:`exhaustive`), computed at most once.

    Shared by the ``exhaustive`` method and by the searches it caps: a search that would
    evaluate at least as many allocations per example as there are runs as the enumeration
    instead (``evaluations`` = the number of feasible allocations, ``mean_correct`` the exact
    accuracy under one uniformly random feasible allocation).
    """

    def __init__(self, model, images, labels, budget: policy.Budget, max_allocations: int,
                 example_chunk: int):  # fmt: skip
        self.n = policy.num_allocations(budget)
        self.allowed = self.n <= max_allocations
        self.notes: dict[str, str] = {}
        self._args = (model, images, labels, budget, example_chunk)
        self._done: tuple[np.ndarray, np.ndarray, np.ndarray, SearchResult, float] | None = None

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, SearchResult, float]:
        """``(allocations [N, L], loss [N, B], correct [N, B], search result, seconds)``."""
        if self._done is None:
            model, images, labels, budget, example_chunk = self._args
            t0 = time.perf_counter()
            allocs = policy.enumerate_allocations(budget, self.n)
            allocs = np.asarray(policy.to_bits(allocs, budget))
            loss, correct = exhaustive(model, images, labels, allocs, example_chunk=example_chunk)
            tracker = _Tracker(len(labels), budget.num_sites)
            per_example = np.broadcast_to(allocs[:, None], (*loss.shape, budget.num_sites))
            tracker.update(loss, correct, per_example)
            self._done = (allocs, loss, correct, tracker.result(), time.perf_counter() - t0)
        return self._done

    def cap(self, name: str, evaluations: int) -> tuple[SearchResult, float] | None:
        """``(result, seconds)`` of the enumeration if ``name`` at ``evaluations`` per example
        is capped (noted in :attr:`notes`), else ``None`` (run the search)."""
        if not self.allowed or evaluations < self.n:
            return None
        *_, found, seconds = self.run()
        self.notes[name] = (
            f"{self.n} feasible allocations <= {evaluations} evaluations: exact enumeration used"
        )
        return found, seconds


def audit(
    model: Any,
    images: ArrayLike,
    labels: ArrayLike,
    *,
    params: Any = None,
    weight_bits: int | None = 8,
    quantize_first: bool = False,
    choices: Sequence[int],
    budget: float,
    methods: Sequence[str] = METHODS,
    max_allocations: int = 5000,
    beam_width: int = 4,
    num_moves: int = 8,
    num_iters: int = 4,
    num_init: int = 0,
    low_starts: bool = True,
    num_random: int | None = None,
    policy_config: PolicyConfig = PolicyConfig(),
    train_images: ArrayLike | None = None,
    train_labels: ArrayLike | None = None,
    seed: int = 0,
    example_chunk: int = 128,
    certify_node_limit: int | None = None,
    certify_time_limit: float | None = None,
    certify_bounds: bool | str = "auto",
    progress: bool = True,
) -> AuditResult:
    """Audits a frozen model's worst case under dynamic PTQ at a bit budget.

    Args:
      model: the network, with no quantization code in it: any ``nnx.Module`` in inference
        use (``net(x) -> logits``; BatchNorm is switched to running statistics with
        ``.eval()``), a function ``fn(params, x) -> logits`` given with ``params`` (e.g. a
        ``flax.linen`` ``module.apply`` with ``params=variables``), or a
        :class:`~ptq_adversary.models.QuantizedModel`. Its quantization sites are derived from
        its program (:mod:`ptq_adversary.transform`).
      images: float ``[B, H, W, C]``, normalized as the model expects; labels: int ``[B]``.
      params: the parameters of a function ``model``.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      quantize_first: also quantize the input of the layer that reads the image.
      choices: the activation bit-width choices (sorted, unique, in [2, 16]).
      budget: mean bits per site; every allocation meets it exactly.
      methods: a subset of :data:`METHODS`.
      max_allocations: run ``exhaustive`` only if there are at most this many feasible
        allocations (else it is listed in ``skipped``). Also the limit below which a search is
        replaced by enumeration: a ``random``, ``greedy`` or ``beam`` search whose evaluations
        per example (``num_random``, or ``1 + num_init + S + num_iters * beam_width *
        num_moves``) reach the number of feasible allocations ``N <= max_allocations`` runs
        as the exact enumeration instead, computed once and shared: its result is the exact
        worst case with ``evaluations = N`` (for ``random``, the exact accuracy under one
        random allocation) and its time the enumeration's, and ``AuditResult.notes`` says so
        per method (e.g. ``"greedy": "22 feasible allocations <= 132 evaluations: exact
        enumeration used"``).
      beam_width, num_moves, num_iters: the beam search (``greedy`` uses width 1 with the same
        number of evaluations per example: ``num_moves * beam_width`` moves per iteration).
      num_init: random feasible allocations that seed greedy and beam search (random restarts;
        added to their evaluation count).
      low_starts: also seed greedy and beam search with :func:`low_bit_starts` (``L`` more
        evaluations per example, at most). On the default student at equal cost this made
        greedy search beat random search from 9 evaluations per example up, where without it
        random search did more damage below 33 (experiments/results/audit_search).
      num_random: draws per example for random search; default: the beam's evaluation count,
        so that the two compare at equal cost.
      policy_config: the ``policy`` method's REINFORCE training (:class:`PolicyConfig`).
      train_images, train_labels: data the policy is trained on (default: the audited images,
        which makes ``policy`` an optimistic, in-sample estimate).
      seed: seeds every random choice.
      example_chunk: examples per compiled call.
      certify_node_limit, certify_time_limit, certify_bounds: ``certify``'s ``node_limit``
        (nodes per example), ``time_limit`` (seconds) and ``bounds``
        (:func:`ptq_adversary.certify.certify`). Its candidate leaves are the allocations the
        methods run before it found per example, then the uniform and low-bit allocations.
      progress: show progress bars.

    Returns:
      An :class:`AuditResult`.

    Raises:
      ValueError: bad images or labels (shape, dtype, non-finite values), unknown methods, a
        model that rejects the images; :class:`transform.TransformError` (a ValueError) for a
        program without sites, with a site in a loop, that mixes examples, or whose output
        ignores the bits; TypeError for a function without ``params``;
        :class:`policy.InfeasibleBudgetError` for an infeasible budget.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    model = _as_model(model, images, params, weight_bits, quantize_first)
    images, labels = _check_inputs(images, labels)
    num_classes = _num_classes(model, images)  # ValueError if the model rejects the images
    _check_labels(labels, num_classes)
    qfn = check_program(model, images)  # TransformError: no site, mixed examples, dead bits
    num_sites, site_names = qfn.num_sites, qfn.site_names
    bud = policy.Budget(tuple(int(c) for c in choices), num_sites, float(budget))
    graphdef, params, rest = split_model(model)

    fp = [
        _fp_eval(
            graphdef,
            params,
            rest,
            jnp.asarray(images[i : i + 512]),
            jnp.asarray(labels[i : i + 512]),
        )
        for i in range(0, len(images), 512)
    ]
    fp_loss, fp_correct, fp_margin = (
        np.concatenate([np.asarray(f[k]) for f in fp]) for k in range(3)
    )
    fp_correct = fp_correct.astype(bool)
    n_alloc = policy.num_allocations(bud)
    results: dict[str, MethodResult] = {}
    skipped: dict[str, str] = {}
    random_accuracy = None
    worst_static = None
    min_low = np.full(len(labels), -1, np.int64)
    num_starts = len(low_bit_starts(bud)) if low_starts else 0
    search_evals = 1 + num_init + num_starts + num_iters * beam_width * num_moves
    # A search at least as costly as enumerating every allocation runs as the enumeration.
    exact = _Enumeration(model, images, labels, bud, max_allocations, example_chunk)

    for name in [m for m in METHODS if m in methods]:
        t0 = time.perf_counter()
        if name == "uniform":
            bits = np.broadcast_to(
                np.asarray(policy.to_bits(policy.uniform_allocation(bud), bud)),
                (len(labels), num_sites),
            )
            loss, correct = evaluate_allocations(model, images, labels, bits)
            results[name] = MethodResult(
                float(correct.mean()),
                fp_correct & ~correct,
                loss,
                np.asarray(bits),
                1,
                time.perf_counter() - t0,
            )
        elif name == "random":
            capped = exact.cap(name, num_random or search_evals)
            if capped is None:
                found = random_search(
                    model,
                    images,
                    labels,
                    bud,
                    seed=seed,
                    num_samples=num_random or search_evals,
                    example_chunk=example_chunk,
                )
                capped = found, time.perf_counter() - t0
            found, seconds = capped
            random_accuracy = float(found.mean_correct.mean())
            results["random_search"] = _method(found, fp_correct, seconds)
        elif name in ("greedy", "beam"):
            capped = exact.cap(name, search_evals)
            if capped is None:
                width = 1 if name == "greedy" else beam_width
                moves = num_moves * beam_width // width  # equal evaluations for greedy and beam
                found = beam_search(
                    model,
                    images,
                    labels,
                    bud,
                    width=width,
                    num_moves=moves,
                    num_iters=num_iters,
                    num_init=num_init,
                    low_starts=low_starts,
                    seed=seed,
                    example_chunk=example_chunk,
                )
                capped = found, time.perf_counter() - t0
            found, seconds = capped
            results[name] = _method(found, fp_correct, seconds)
        elif name == "policy":
            tx = images if train_images is None else train_images
            ty = labels if train_labels is None else train_labels
            net = train_policy(model, tx, ty, bud, policy_config, seed=seed, progress=progress)
            bits = policy_allocations(net, images, bud)
            loss, correct = evaluate_allocations(model, images, labels, bits)
            results[name] = MethodResult(
                float(correct.mean()),
                fp_correct & ~correct,
                loss,
                bits,
                1,
                time.perf_counter() - t0,
            )
        elif name == "exhaustive":
            if n_alloc > max_allocations:
                skipped[name] = (
                    f"{n_alloc} feasible allocations exceed max_allocations={max_allocations}"
                )
                continue
            allocs, loss, correct, found, seconds = exact.run()  # shared with capped searches
            results[name] = _method(found, fp_correct, seconds)
            low = (allocs < bud.budget).sum(axis=1)  # [N] sites below the budget
            flips = ~correct & fp_correct[None]
            counts = np.where(flips, low[:, None], np.iinfo(np.int64).max).min(axis=0)
            min_low = np.where(flips.any(axis=0), counts, -1)
            per_alloc = correct.mean(axis=1)
            worst = int(np.argmin(per_alloc))
            worst_static = {"bits": allocs[worst].tolist(), "accuracy": float(per_alloc[worst])}
        elif name == "certify":
            found = [results[k].bits for k in _STRENGTH if k in results]
            general = certify_lib.default_candidates(bud)
            cands = np.concatenate([
                np.stack(found) if found else np.zeros((0, len(labels), num_sites), np.int32),
                np.broadcast_to(general[:, None], (len(general), len(labels), num_sites)),
            ])  # fmt: skip
            cert = certify_lib.certify(
                model, images, labels, bud, candidates=cands, bounds=certify_bounds,
                node_limit=certify_node_limit, time_limit=certify_time_limit,
                example_chunk=max(example_chunk, 256), progress=progress,
            )  # fmt: skip
            extra = cert.summary()
            extra.pop("seconds")
            uniform = np.asarray(policy.to_bits(policy.uniform_allocation(bud), bud))
            results[name] = MethodResult(
                cert.accuracy,
                fp_correct & cert.broken,
                np.where(np.isfinite(cert.worst_loss), cert.worst_loss, fp_loss),
                np.where(cert.bits >= 0, cert.bits, uniform[None]).astype(np.int32),
                int(round(float(cert.nodes.mean()))),
                time.perf_counter() - t0,
                extra,
            )

    vulnerable = np.any([m.broken for m in results.values()], axis=0)
    worst_loss = np.max([m.worst_loss for m in results.values()], axis=0)
    # Per example, the allocation from the strongest method that broke it (else the strongest
    # method's worst-loss allocation).
    by_strength = [results[k] for k in _STRENGTH if k in results]
    breaking = by_strength[0].bits.copy()
    for m in reversed(by_strength):
        breaking = np.where(m.broken[:, None], m.bits, breaking)
    return AuditResult(
        site_names=site_names,
        choices=bud.choices,
        budget=bud.budget,
        num_allocations=n_alloc,
        fp_accuracy=float(fp_correct.mean()),
        fp_correct=fp_correct,
        fp_loss=fp_loss,
        fp_margin=fp_margin,
        labels=labels,
        methods=results,
        random_accuracy=random_accuracy,
        vulnerable=vulnerable,
        loss_increase=(worst_loss - fp_loss).astype(np.float32),
        breaking_bits=breaking,
        min_low_bit_sites=min_low,
        worst_static=worst_static,
        skipped=skipped,
        notes=exact.notes,
    )


# ------------------------------------------------------------------------------- report
_METHOD_LABELS = {
    "uniform": "uniform (static)",
    "random_search": "random search",
    "greedy": "greedy search",
    "beam": "beam search",
    "policy": "learned policy",
    "exhaustive": "exhaustive (oracle)",
    "certify": "certify (branch and bound)",
}


def write_report(
    result: AuditResult, out_dir: str, *, title: str = "DPTQ audit", top: int = 20
) -> dict[str, str]:
    """Writes an audit as ``audit.json``, ``methods.csv``, ``examples.csv``, ``summary.md`` and
    PNG plots into ``out_dir`` (each file written atomically).

    Args:
      result: from :func:`audit`.
      out_dir: created if missing.
      title: the markdown heading.
      top: how many of the most vulnerable examples the summary lists (only vulnerable
        ones: correct in FP and broken by some method).

    ``examples.csv`` has a row for every example, in index order; its ``status`` column is
    ``vulnerable``, ``robust`` or ``wrong_in_fp`` (:func:`example_status`) and ``rank`` its
    place in :meth:`AuditResult.ranking`. The ``bits_*`` columns are the breaking allocation
    of a vulnerable example; for the others, which nothing found breaks, the allocation of the
    highest quantized loss found.

    Returns:
      ``{kind: path}`` of the files written.
    """
    import os  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (
            ("json", "audit.json"),
            ("methods_csv", "methods.csv"),
            ("examples_csv", "examples.csv"),
            ("markdown", "summary.md"),
            ("accuracy_png", "accuracy_by_method.png"),
            ("margin_png", "vulnerability_vs_margin.png"),
            ("bits_png", "breaking_bits.png"),
        )
    }
    summary = result.summary()
    io.write_json_atomic(paths["json"], summary)

    rows = ["method,accuracy,drop_points,flip_rate,evaluations_per_example,seconds"]
    for name, m in summary["methods"].items():
        rows.append(
            f"{name},{m['accuracy']:.6f},{m['drop_points']:.4f},{m['flip_rate']:.6f},"
            f"{m['evaluations_per_example']},{m['seconds']}"
        )
    io.write_text_atomic(paths["methods_csv"], "\n".join(rows) + "\n")

    site_cols = ",".join(f"bits_{s}" for s in result.site_names)
    rows = [
        f"index,rank,status,label,fp_correct,fp_margin,fp_loss,loss_increase,vulnerable,"
        f"min_low_bit_sites,{site_cols}"
    ]
    rank = np.empty(result.num_examples, np.int64)
    rank[result.ranking()] = np.arange(result.num_examples)
    status = example_status(result)
    for i in range(result.num_examples):
        bits = ",".join(str(int(b)) for b in result.breaking_bits[i])
        rows.append(
            f"{i},{rank[i]},{status[i]},{int(result.labels[i])},{int(result.fp_correct[i])},"
            f"{result.fp_margin[i]:.5f},{result.fp_loss[i]:.5f},"
            f"{result.loss_increase[i]:.5f},{int(status[i] == 'vulnerable')},"
            f"{int(result.min_low_bit_sites[i])},{bits}"
        )
    io.write_text_atomic(paths["examples_csv"], "\n".join(rows) + "\n")

    io.write_text_atomic(paths["markdown"], _markdown(result, summary, title, top))
    _plots(result, paths)
    return paths


def _markdown(result: AuditResult, summary: dict[str, Any], title: str, top: int) -> str:
    fp = summary["fp_accuracy"]
    lines = [
        f"# {title}",
        "",
        f"{result.num_examples} examples; sites {', '.join(result.site_names)}; activation "
        f"bit choices {list(result.choices)} at a mean budget of {result.budget:g} bits "
        f"({result.num_allocations} feasible allocations). Full precision: {fp:.2%}.",
        "",
        "| method | accuracy | drop (pts) | FP-correct flipped | evaluations / example | "
        "time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        acc = f"{m['accuracy']:.2%}"
        if "certified_accuracy" in m:  # a bracket: [proved, found]
            acc = f"[{m['certified_accuracy']:.2%}, {m['accuracy']:.2%}]"
        lines.append(
            f"| {_METHOD_LABELS.get(name, name)} | {acc} | "
            f"{m['drop_points']:.2f} | {m['flip_rate']:.2%} | "
            f"{m['evaluations_per_example']} | {m['seconds']:.1f} |"
        )
    lines.append("")
    if "certify" in summary["methods"]:
        c = summary["methods"]["certify"]
        width = 100 * (c["accuracy"] - c["certified_accuracy"])
        lines += [
            f"Certified worst-case accuracy in [{c['certified_accuracy']:.2%}, "
            f"{c['accuracy']:.2%}] (width {width:.2f} points; "
            + ("exact" if c["exact"] else f"not closed: {c['stopped']}")
            + f"): {c['states']['certified']} examples proved correct under every feasible "
            f"allocation, {c['states']['broken']} broken, {c['states']['unknown']} unknown; "
            f"{c['nodes']} nodes evaluated, {c['bound_calls']} bounded, {c['pruned']} pruned, "
            f"{c['leaves']} full allocations.",
            "",
        ]
    if summary["random_accuracy"] is not None:
        lines.append(
            f"One random feasible allocation per example: {summary['random_accuracy']:.2%}"
            " accuracy (expected over the draws)."
        )
    if result.worst_static is not None:
        lines.append(
            f"Worst single allocation for all examples: bits {result.worst_static['bits']}"
            f" -> {result.worst_static['accuracy']:.2%}."
        )
    for name, why in result.skipped.items():
        lines.append(f"Skipped `{name}`: {why}.")
    for name, why in result.notes.items():
        lines.append(f"`{name}`: {why}.")
    status = _status_codes(result)
    n_vul, n_right = int((status == 0).sum()), int((status < 2).sum())
    lines += [
        "",
        f"Vulnerable (FP-correct, broken by some allocation found): {n_vul / len(status):.2%} "
        f"of examples ({n_vul} of the {n_right} correct in FP); mean loss increase "
        f"{result.loss_increase.mean():.3f} nats.",
    ]
    known = result.min_low_bit_sites >= 0
    if known.any():
        counts = np.bincount(result.min_low_bit_sites[known], minlength=len(result.site_names) + 1)
        parts = ", ".join(f"{k}: {c}" for k, c in enumerate(counts) if c)
        lines.append(
            f"Fewest sites below the budget that break a vulnerable example "
            f"(count of examples): {parts}."
        )
    shown = result.ranking()[: min(max(top, 0), n_vul)]  # the ranking starts with them
    if len(shown) == 0:
        lines += [
            "",
            "## The most vulnerable examples",
            "",
            "No vulnerable examples: no allocation found misclassifies an example that is "
            "correct in full precision.",
        ]
    else:
        heading = (
            f"The {len(shown)} most vulnerable examples"
            if len(shown) > 1
            else "The most vulnerable example"
        )
        more = f" (of {n_vul} vulnerable)" if len(shown) < n_vul else ""
        lines += [
            "",
            f"## {heading}{more}",
            "",
            f"| index | label | FP margin | loss increase | breaking bits "
            f"({', '.join(result.site_names)}) |",
            "|---:|---:|---:|---:|---|",
        ]
    for i in shown:
        lines.append(
            f"| {i} | {result.labels[i]} | {result.fp_margin[i]:.2f} | "
            f"{result.loss_increase[i]:.2f} | {result.breaking_bits[i].tolist()} |"
        )
    lines += [
        "",
        "Files: `audit.json`, `methods.csv`, `examples.csv` (every example, with its status),",
        "`accuracy_by_method.png`, `vulnerability_vs_margin.png`, `breaking_bits.png`.",
        "",
    ]
    return "\n".join(lines)


def _bar_label_x(value: float, line: float, width: float, gap: float = 1.0):
    """Where a horizontal bar's value label goes so that it stays clear of a vertical line.

    Args:
      value: the bar's length; line: the line's position; width: the label's width (all in
        data units); gap: the space kept to the bar's end and to the line.

    Returns:
      ``(x, inside)``: the label's left edge, and whether it lies on the bar (white text).
      Preferred: on the bar against its end; else on the bar left of the line (where the
      line crosses the bar); else after the bar's end, or after the line if it is in the way.
    """
    clear = lambda x0: not x0 - gap < line < x0 + width + gap
    if value - gap - width >= gap and clear(value - gap - width):
        return value - gap - width, True
    if line < value and line - gap - width >= gap:
        return line - gap - width, True
    if clear(value + gap):
        return value + gap, False
    return max(value, line) + gap, False


def _accuracy_figure(result: AuditResult):
    """Accuracy per method as bars against the FP accuracy (a dashed line behind the bars,
    its value in the legend); each bar's value label is placed clear of the line."""
    plt = plotting.pyplot()
    names = list(result.methods)
    acc = [100 * result.methods[n].accuracy for n in names]
    fp = 100 * result.fp_accuracy
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.axvline(fp, color="k", ls="--", lw=1, zorder=1, label=f"full precision: {fp:.1f}%")
    labels = [_METHOD_LABELS.get(n, n) for n in names]
    ax.barh(labels, acc, color="tab:red", zorder=2)
    proved = [100 * result.methods[n].extra.get("certified_accuracy", np.nan) for n in names]
    if np.isfinite(proved).any():  # certify: the proved part of its bar, hatched
        ax.barh(labels, np.nan_to_num(proved), color="darkred", hatch="//", edgecolor="white",
                zorder=2.5, label="certified (proved)")  # fmt: skip
    ax.set_xlabel("test accuracy under DPTQ (%)")
    ax.set_xlim(0, 105)
    ax.invert_yaxis()
    ax.set_title(f"Accuracy by allocation method (budget {result.budget:g} bits)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # fixes the axes' size, so label widths convert to data units
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    for y, a in enumerate(acc):
        text = ax.text(0, y, f"{a:.1f}", fontsize=8, fontweight="bold", va="center", zorder=3)
        px = text.get_window_extent(renderer).width  # bold: the wider of the two weights
        width = to_data.transform((px, 0))[0] - to_data.transform((0, 0))[0]
        x, inside = _bar_label_x(a, fp, width)
        text.set_x(x)
        if not inside:  # after the bar: plain black text
            text.set_color("black")
            text.set_fontweight("normal")
        else:
            text.set_color("white")
    return fig


_CURVE_STYLES = ("-", "--", "-.", ":")
_CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _margin_figure(result: AuditResult):
    """Flip rate per FP-margin decile, one curve per method.

    Every curve has its own line style and marker, is shifted a little sideways, and later
    curves are drawn with smaller markers on top, so overlapping curves all stay visible; a
    curve equal to an earlier one says so in the legend.
    """
    plt = plotting.pyplot()
    names = list(result.methods)
    right = result.fp_correct.astype(bool)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    if right.sum() >= 10:
        margins = result.fp_margin[right]
        edges = np.quantile(margins, np.linspace(0, 1, 11))
        decile = np.clip(np.searchsorted(edges, margins, side="right") - 1, 0, 9)
        drawn: dict[str, np.ndarray] = {}
        for k, name in enumerate(names):
            broken = result.methods[name].broken[right]
            rate = np.array(
                [
                    100 * broken[decile == d].mean() if (decile == d).any() else np.nan
                    for d in range(10)
                ]
            )
            label = _METHOD_LABELS.get(name, name)
            same = [n for n, r in drawn.items() if np.array_equal(r, rate, equal_nan=True)]
            if same:
                label += f" (identical to {_METHOD_LABELS.get(same[0], same[0])})"
            drawn[name] = rate
            offset = 0.07 * (k - (len(names) - 1) / 2)
            ax.plot(
                np.arange(1, 11) + offset,
                rate,
                ls=_CURVE_STYLES[k % len(_CURVE_STYLES)],
                marker=_CURVE_MARKERS[k % len(_CURVE_MARKERS)],
                ms=max(3.0, 7.5 - 0.8 * k),
                lw=1.3,
                alpha=0.9,
                zorder=2 + k,
                label=label,
            )
    ax.set_xlabel("FP margin decile (1 = smallest logit margin; curves shifted sideways)")
    ax.set_ylabel("FP-correct examples flipped (%)")
    ax.set_xticks(np.arange(1, 11))
    ax.set_ylim(-3, 103)
    ax.set_title("Who breaks: flip rate vs full-precision margin")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _plots(result: AuditResult, paths: dict[str, str]) -> None:
    plt = plotting.pyplot()
    for kind, figure in (("accuracy_png", _accuracy_figure), ("margin_png", _margin_figure)):
        fig = figure(result)
        fig.savefig(paths[kind], dpi=130)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    vul = _status_codes(result) == 0
    width = 0.8 / len(result.choices)
    for k, c in enumerate(result.choices):
        frac = [
            100 * np.mean(result.breaking_bits[vul, s] == c) if vul.any() else 0.0
            for s in range(len(result.site_names))
        ]
        ax.bar(
            np.arange(len(result.site_names)) + (k - len(result.choices) / 2 + 0.5) * width,
            frac,
            width,
            label=f"{c} bits",
        )
    ax.set_xticks(np.arange(len(result.site_names)), result.site_names)
    ax.set_xlabel("quantization site (forward order)")
    ax.set_ylabel("breaking allocations (%)")
    ax.set_title(
        f"Bits per site in the allocations that break the {int(vul.sum())} vulnerable examples",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths["bits_png"], dpi=130)
    plt.close(fig)
