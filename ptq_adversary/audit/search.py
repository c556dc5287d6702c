"""Per-example searches over the feasible allocations: random search and beam search.

``random``
  allocations drawn uniformly from all feasible ones (:func:`random_search`): the accuracy
  under one random draw, and the worst of ``E`` draws per example, the baseline every search
  must beat.
``greedy`` / ``beam``
  per-example local search maximising the quantized cross-entropy (:func:`beam_search`): from
  the uniform allocation, repeatedly move bits between two sites (exact sum kept,
  :func:`neighbours`) and keep the ``W`` best allocations (``W = 1`` greedy).

Both report a :class:`SearchResult`, accumulated over batches of evaluated allocations by a
:class:`Tracker`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import policy
from ptq_adversary.audit import evaluate
from ptq_adversary.models import split_model
from ptq_adversary.policy import low_bit_starts

__all__ = ["SearchResult", "Tracker", "beam_search", "neighbours", "random_search"]


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


class Tracker:
    """Running worst case per example over batches of evaluated allocations.

    Args:
      batch: ``B``, the examples tracked; num_sites: ``L``.
    """

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
        """The :class:`SearchResult` of every allocation added so far."""
        broken = np.isfinite(self.broken_loss)
        return SearchResult(
            worst_loss=self.worst_loss,
            worst_bits=self.worst_bits,
            broken=broken,
            broken_bits=np.where(broken[:, None], self.broken_bits, self.worst_bits),
            mean_correct=(self.correct_sum / max(self.count, 1)).astype(np.float32),
            evaluations=self.count,
        )


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
    images, labels = evaluate.check_inputs(images, labels)
    draw = jax.jit(jax.vmap(jax.vmap(lambda k: policy.sample_uniform(k, budget))))
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(images), example_chunk):
        x = jnp.asarray(images[start : start + example_chunk])
        y = jnp.asarray(labels[start : start + example_chunk])
        tracker = Tracker(len(x), budget.num_sites)
        for c0 in range(0, num_samples, alloc_chunk):
            c = min(alloc_chunk, num_samples - c0)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
                (start * num_samples + c0 * len(x)) + jnp.arange(c * len(x))
            ).reshape(c, len(x))
            bits = policy.to_bits(draw(keys), budget)  # [c, B, L]
            loss, correct = evaluate.eval_per_example(graphdef, params, rest, x, y, bits)
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


def neighbours(key, idx_wbl, budget: policy.Budget, num_moves: int):
    """``num_moves`` random feasible neighbours of each allocation ``[W, B, L]`` (indices).

    A neighbour moves site ``i`` to another choice and site ``j`` to the choice that keeps the
    exact bit sum. Where fewer moves are feasible, the rest repeat the allocation itself.

    Args:
      key: a PRNG key; idx_wbl: int choice indices ``[W, B, L]``.

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
    moves (:func:`neighbours`) from each of the ``width`` allocations in the beam, evaluates
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
    images, labels = evaluate.check_inputs(images, labels)
    uniform = jnp.asarray(policy.uniform_allocation(budget), jnp.int32)
    starts = low_bit_starts(budget) if low_starts else np.zeros((0, budget.num_sites))
    starts = jnp.asarray(starts, jnp.int32)
    key = jax.random.key(seed)
    draw = jax.jit(jax.vmap(jax.vmap(lambda k: policy.sample_uniform(k, budget))))

    @jax.jit
    def iterate(key, beam_idx, beam_loss, x, y):
        cand = neighbours(key, beam_idx, budget, num_moves)  # [W*M, B, L]
        bits = policy.to_bits(cand, budget)
        loss, correct = evaluate.eval_per_example(graphdef, params, rest, x, y, bits)
        pool = jnp.concatenate([beam_idx, cand])
        pool_loss = jnp.concatenate([beam_loss, loss])
        new_idx, new_loss = _select(pool, pool_loss, width)
        return new_idx, new_loss, loss, correct, bits

    out = []
    for start in range(0, len(images), example_chunk):
        x = jnp.asarray(images[start : start + example_chunk])
        y = jnp.asarray(labels[start : start + example_chunk])
        batch = x.shape[0]
        tracker = Tracker(batch, budget.num_sites)
        init_bits = jnp.broadcast_to(policy.to_bits(uniform, budget), (1, batch, len(uniform)))
        loss, correct = evaluate.eval_per_example(graphdef, params, rest, x, y, init_bits)
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
            loss, correct = evaluate.eval_per_example(graphdef, params, rest, x, y, init_bits)
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
