"""The audit's methods as a registry of callables, one signature each.

:data:`REGISTRY` maps each method name to a function ``method(ctx, found) -> MethodOutcome``:
``ctx`` is the :class:`AuditContext` (the audited model and inputs, the budget, the full-
precision outcome, the options, and the :class:`Enumeration` the methods share), ``found`` the
:class:`~ptq_adversary.audit.MethodResult` of each method run before it (``certify`` starts
from their allocations). :func:`~ptq_adversary.audit.audit` runs the requested methods in the
registry's order, :data:`METHODS`, and merges their :class:`MethodOutcome`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from ptq_adversary import policy
from ptq_adversary.audit import attack, evaluate
from ptq_adversary.audit.branch_and_bound import certify
from ptq_adversary.audit.certificates import default_candidates
from ptq_adversary.audit.enumeration import exhaustive
from ptq_adversary.audit.results import STRENGTH, MethodResult
from ptq_adversary.audit.search import SearchResult, Tracker, beam_search, random_search
from ptq_adversary.models import QuantizedModel

__all__ = ["METHODS", "REGISTRY", "AuditContext", "Enumeration", "MethodOutcome"]


class Enumeration:
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
            tracker = Tracker(len(labels), budget.num_sites)
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


@dataclasses.dataclass(frozen=True)
class AuditContext:
    """What every method gets: the audited model and inputs, the budget, the options.

    Attributes:
      model: the audited :class:`QuantizedModel`.
      images: float32 ``[B, H, W, C]``; labels: int32 ``[B]`` (checked).
      budget: the :class:`policy.Budget` audited.
      fp_correct: bool ``[B]``; fp_loss: float32 ``[B]``: the full-precision outcome.
      search_evals: evaluations per example of greedy and beam search (``1 + num_init + S +
        num_iters * beam_width * num_moves``), the default of random search.
      exact: the :class:`Enumeration` shared by ``exhaustive`` and the searches it caps.
      The rest: :func:`~ptq_adversary.audit.audit`'s options of the same names.
    """

    model: QuantizedModel
    images: np.ndarray
    labels: np.ndarray
    budget: policy.Budget
    fp_correct: np.ndarray
    fp_loss: np.ndarray
    search_evals: int
    exact: Enumeration
    max_allocations: int
    beam_width: int
    num_moves: int
    num_iters: int
    num_init: int
    low_starts: bool
    num_random: int | None
    policy_config: attack.PolicyConfig
    train_images: ArrayLike | None
    train_labels: ArrayLike | None
    seed: int
    example_chunk: int
    certify_node_limit: int | None
    certify_time_limit: float | None
    certify_bounds: bool | str
    progress: bool


@dataclasses.dataclass(frozen=True)
class MethodOutcome:
    """What one method adds to the audit (fields left ``None``: nothing).

    Attributes:
      results: :class:`MethodResult` by result name (``random`` reports ``random_search``).
      skipped: why the method did not run.
      random_accuracy: expected accuracy under one random feasible allocation.
      worst_static: the single allocation with the lowest accuracy (``exhaustive``).
      min_low_bit_sites: int ``[B]``: fewest sites below the budget of a breaking allocation
        (``exhaustive``).
    """

    results: dict[str, MethodResult] = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    random_accuracy: float | None = None
    worst_static: dict[str, Any] | None = None
    min_low_bit_sites: np.ndarray | None = None


Method = Callable[[AuditContext, Mapping[str, MethodResult]], MethodOutcome]


def _from_search(tracked: SearchResult, fp_correct: np.ndarray, seconds: float):
    return MethodResult(
        accuracy=float(np.mean(~tracked.broken)),
        broken=fp_correct & tracked.broken,
        worst_loss=tracked.worst_loss,
        bits=tracked.broken_bits,
        evaluations=tracked.evaluations,
        seconds=seconds,
    )


def _one_allocation(ctx: AuditContext, bits: np.ndarray, t0: float) -> MethodResult:
    """The outcome of one allocation per example, ``bits [B, L]``."""
    loss, correct = evaluate.evaluate_allocations(ctx.model, ctx.images, ctx.labels, bits)
    return MethodResult(
        float(correct.mean()),
        ctx.fp_correct & ~correct,
        loss,
        np.asarray(bits),
        1,
        time.perf_counter() - t0,
    )


def run_uniform(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """The one allocation a static deployment would use (:func:`policy.uniform_allocation`)."""
    t0 = time.perf_counter()
    bud = ctx.budget
    bits = np.broadcast_to(
        np.asarray(policy.to_bits(policy.uniform_allocation(bud), bud)),
        (len(ctx.labels), bud.num_sites),
    )
    return MethodOutcome({"uniform": _one_allocation(ctx, bits, t0)})


def run_random(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """Random search (:func:`~ptq_adversary.audit.random_search`), ``num_random`` draws per
    example (default: the searches' cost), or the enumeration where that costs no more."""
    t0 = time.perf_counter()
    num_samples = ctx.num_random or ctx.search_evals
    capped = ctx.exact.cap("random", num_samples)
    if capped is None:
        result = random_search(
            ctx.model,
            ctx.images,
            ctx.labels,
            ctx.budget,
            seed=ctx.seed,
            num_samples=num_samples,
            example_chunk=ctx.example_chunk,
        )
        capped = result, time.perf_counter() - t0
    result, seconds = capped
    return MethodOutcome(
        {"random_search": _from_search(result, ctx.fp_correct, seconds)},
        random_accuracy=float(result.mean_correct.mean()),
    )


def _local_search(ctx: AuditContext, name: str, width: int) -> MethodOutcome:
    """Beam search of ``width`` (:func:`~ptq_adversary.audit.beam_search`) at the cost of the
    beam's ``num_moves * beam_width`` moves per iteration, or the enumeration if cheaper."""
    t0 = time.perf_counter()
    capped = ctx.exact.cap(name, ctx.search_evals)
    if capped is None:
        moves = ctx.num_moves * ctx.beam_width // width  # equal evaluations for greedy and beam
        result = beam_search(
            ctx.model,
            ctx.images,
            ctx.labels,
            ctx.budget,
            width=width,
            num_moves=moves,
            num_iters=ctx.num_iters,
            num_init=ctx.num_init,
            low_starts=ctx.low_starts,
            seed=ctx.seed,
            example_chunk=ctx.example_chunk,
        )
        capped = result, time.perf_counter() - t0
    result, seconds = capped
    return MethodOutcome({name: _from_search(result, ctx.fp_correct, seconds)})


def run_greedy(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """Greedy hill climbing: beam search of width 1."""
    return _local_search(ctx, "greedy", 1)


def run_beam(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """Beam search of width ``beam_width``."""
    return _local_search(ctx, "beam", ctx.beam_width)


def run_policy(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """The attack policy trained against the frozen network (:mod:`~ptq_adversary.audit.attack`)
    on ``train_images`` (default: the audited images), deployed greedily."""
    t0 = time.perf_counter()
    tx = ctx.images if ctx.train_images is None else ctx.train_images
    ty = ctx.labels if ctx.train_labels is None else ctx.train_labels
    net = attack.train_policy(
        ctx.model, tx, ty, ctx.budget, ctx.policy_config, seed=ctx.seed, progress=ctx.progress
    )
    bits = attack.policy_allocations(net, ctx.images, ctx.budget)
    return MethodOutcome({"policy": _one_allocation(ctx, bits, t0)})


def run_exhaustive(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """Every feasible allocation (the oracle), if there are at most ``max_allocations``; with
    the fewest low-bit sites that break each example and the worst static allocation."""
    if not ctx.exact.allowed:
        return MethodOutcome(
            skipped=f"{ctx.exact.n} feasible allocations exceed "
            f"max_allocations={ctx.max_allocations}"
        )
    allocs, loss, correct, result, seconds = ctx.exact.run()  # shared with capped searches
    low = (allocs < ctx.budget.budget).sum(axis=1)  # [N] sites below the budget
    flips = ~correct & ctx.fp_correct[None]
    counts = np.where(flips, low[:, None], np.iinfo(np.int64).max).min(axis=0)
    per_alloc = correct.mean(axis=1)
    worst = int(np.argmin(per_alloc))
    return MethodOutcome(
        {"exhaustive": _from_search(result, ctx.fp_correct, seconds)},
        worst_static={"bits": allocs[worst].tolist(), "accuracy": float(per_alloc[worst])},
        min_low_bit_sites=np.where(flips.any(axis=0), counts, -1),
    )


def run_certify(ctx: AuditContext, found: Mapping[str, MethodResult]) -> MethodOutcome:
    """:func:`~ptq_adversary.audit.certify`, its candidate leaves the allocations the methods
    before it found per example (strongest first), then the uniform and low-bit ones."""
    t0 = time.perf_counter()
    bud, n, num_sites = ctx.budget, len(ctx.labels), ctx.budget.num_sites
    finds = [found[k].bits for k in STRENGTH if k in found]
    general = default_candidates(bud)
    cands = np.concatenate([
        np.stack(finds) if finds else np.zeros((0, n, num_sites), np.int32),
        np.broadcast_to(general[:, None], (len(general), n, num_sites)),
    ])  # fmt: skip
    cert = certify(
        ctx.model, ctx.images, ctx.labels, bud, candidates=cands, bounds=ctx.certify_bounds,
        node_limit=ctx.certify_node_limit, time_limit=ctx.certify_time_limit,
        example_chunk=max(ctx.example_chunk, 256), progress=ctx.progress,
    )  # fmt: skip
    extra = cert.summary()
    extra.pop("seconds")
    uniform_bits = np.asarray(policy.to_bits(policy.uniform_allocation(bud), bud))
    result = MethodResult(
        cert.accuracy,
        ctx.fp_correct & cert.broken,
        np.where(np.isfinite(cert.worst_loss), cert.worst_loss, ctx.fp_loss),
        np.where(cert.bits >= 0, cert.bits, uniform_bits[None]).astype(np.int32),
        int(round(float(cert.nodes.mean()))),
        time.perf_counter() - t0,
        extra,
    )
    return MethodOutcome({"certify": result})


#: Method name -> its callable, in the order :func:`~ptq_adversary.audit.audit` runs them.
REGISTRY: dict[str, Method] = {
    "uniform": run_uniform,
    "random": run_random,
    "greedy": run_greedy,
    "beam": run_beam,
    "policy": run_policy,
    "exhaustive": run_exhaustive,
    "certify": run_certify,
}

#: The audit's methods, in the order they run.
METHODS = tuple(REGISTRY)
