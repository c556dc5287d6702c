"""The nodes of branch and bound (:mod:`ptq_adversary.audit.branch_and_bound`): how they are
evaluated and recorded.

* :func:`compiled_step`: one jitted batch step from a cut (a segment's exact values, a leaf's
  loss and correctness, or a lower bound of the margin, by intervals or the linear
  relaxation), cached per program;
* :func:`run_batched`: a step on gathered rows of the live values, in padded chunks, under a
  deadline, timing the warm calls;
* :class:`BudgetTables`: which bit-widths the rest of the budget allows, and forced
  completions;
* :class:`SearchRecord`: the mutable per-example record of a search, with the cost model
  that decides ``bounds="auto"`` per depth (:data:`PROBE_NODES`, :data:`MIN_PRUNE_RATE`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptq_adversary import policy
from ptq_adversary.audit.certificates import BROKEN, OPEN

__all__ = [
    "MIN_PRUNE_RATE",
    "PROBE_NODES",
    "BudgetTables",
    "SearchRecord",
    "compiled_step",
    "run_batched",
]

#: ``bounds="auto"``: nodes of a depth bounded before deciding whether bounding that depth
#: pays (:meth:`SearchRecord.pays`), and the share of them that must be certified for bounds
#: to stay on there when no timing is available.
PROBE_NODES = 128
MIN_PRUNE_RATE = 0.05


@functools.lru_cache(maxsize=256)
def compiled_step(qfn, kind: str, start: int, choices: tuple[int, ...] = (), total: int = 0):
    """One jitted batch step from the cut before segment ``start`` (cached per program).

    ``kind``: ``"seg"`` (segment ``start``'s exact values), ``"leaf"`` (segments
    ``start..L`` exactly: loss and correctness), ``"interval"`` (segments ``start..L`` in
    interval mode: the lower bound of the margin, true logit minus every other) or
    ``"linear"`` (the same bound tightened by the linear relaxation, the first site split per
    choice and the budget coupled: :meth:`~ptq_adversary.transform.QuantizedFn.bound_margins`
    with ``choices`` and the bits left of ``total`` after the prefix).
    """
    last = qfn.num_segments - 1

    if kind == "seg":
        return jax.jit(lambda state, live, bits: qfn.run_segments(state, live, bits, start, start))

    if kind == "leaf":

        def leaf(state, live, bits, labels):
            logits = qfn.run_segments(state, live, bits, start, last)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return loss, jnp.argmax(logits, -1) == labels

        return jax.jit(leaf)

    def bound(state, live, bits, labels):
        if kind == "interval":
            return jnp.min(qfn.bound_margins(state, live, labels, bits, start), -1)
        remaining = total - jnp.sum(bits[:, : start - 1], axis=1)
        margins = qfn.bound_margins(
            state, live, labels, bits, start, choices=choices, remaining=remaining
        )
        return jnp.min(margins, -1)

    return jax.jit(bound)


def _bucket(n: int, chunk: int) -> int:
    """Rows per call for ``n <= chunk`` rows: a power of two from 32 up, at most ``chunk`` (few
    compiles, little padding)."""
    size = 32
    while size < n:
        size *= 2
    return min(size, chunk)


def run_batched(fn, state, live, index: np.ndarray, bits: np.ndarray, labels, chunk: int,
                deadline, timer: dict | None = None):  # fmt: skip
    """``fn`` (a :func:`compiled_step`) on the rows ``live[index]`` (``index`` int ``[N]``,
    ``live`` leaves ``[R, ...]``) with ``bits`` (numpy ``[N, L]``) and ``labels`` (numpy
    ``[N]`` or ``None``), in padded chunks of ``chunk`` rows.

    Returns the concatenated outputs as numpy arrays (per row; live values as a tuple) or
    ``None`` once ``deadline`` (a ``time.perf_counter`` value) passes.
    ``timer``: ``{fn: [seconds, rows]}`` accumulated over calls of a shape already compiled
    (``timer["seen"]`` holds the shapes seen).
    """
    n = len(index)
    outs = []
    for r0 in range(0, n, chunk):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        rows = index[r0 : r0 + chunk]
        size = _bucket(len(rows), chunk)
        pad = np.concatenate([rows, np.full(size - len(rows), rows[0], rows.dtype)])
        b = np.concatenate(
            [bits[r0 : r0 + chunk], np.repeat(bits[r0 : r0 + 1], size - len(rows), 0)]
        )
        # gathered on the host: an eager device gather would compile once per shape
        sub = jax.tree.map(lambda a, p=pad: np.asarray(a)[p], live)
        args = (state, sub, np.asarray(b, np.int32))
        if labels is not None:
            lab = labels[r0 : r0 + chunk]
            lab = np.concatenate([lab, np.repeat(lab[:1], size - len(rows))])
            args = (*args, np.asarray(lab, np.int32))
        t = time.perf_counter()
        out = fn(*args)
        k = len(rows)
        outs.append(jax.tree.map(lambda a, k=k: np.asarray(a)[:k], out))
        if timer is not None:
            seen = timer.setdefault("seen", set())
            if (fn, size) in seen:
                acc = timer.setdefault(fn, [0.0, 0])
                acc[0] += time.perf_counter() - t
                acc[1] += size
            seen.add((fn, size))
    return outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: np.concatenate(a), *outs)


class BudgetTables:
    """Feasibility tables of a budget: allowed bits, smallest bit, forced completions.

    ``N`` nodes at a time, ``K`` choices; ``remaining``: int ``[N]``, the bits left for the
    ``sites_left`` sites not fixed yet.
    """

    def __init__(self, budget: policy.Budget):
        self.budget = budget
        self.choices = np.asarray(budget.choices, np.int64)
        self.reach = np.asarray(budget.reachable)
        self.counts = np.asarray(budget.counts)
        self.L = budget.num_sites
        self._completions: dict[tuple[int, int], list[int]] = {}

    def allowed(self, sites_left: int, remaining: np.ndarray) -> np.ndarray:
        """bool ``[N, K]``: choice ``c`` feasible at the next site of ``sites_left`` remaining
        (sum ``remaining`` over them)."""
        rest = remaining[:, None] - self.choices[None]
        ok = (rest >= 0) & (rest < self.reach.shape[1])
        return ok & self.reach[sites_left - 1, np.clip(rest, 0, self.reach.shape[1] - 1)]

    def smallest(self, sites_left: int, remaining: np.ndarray) -> np.ndarray:
        """int ``[N]``: the smallest bit any of the ``sites_left`` sites may take."""
        ok = self.allowed(sites_left, remaining)
        return self.choices[np.argmax(ok, axis=1)]

    def forced(self, sites_left: int, remaining: np.ndarray) -> np.ndarray:
        """bool ``[N]``: exactly one completion exists."""
        return self.counts[sites_left, remaining] == 1

    def completion(self, sites_left: int, remaining: int) -> list[int]:
        """The unique completion of a forced node (cached)."""
        key = (sites_left, remaining)
        if key in self._completions:
            return self._completions[key]
        bits = []
        for left in range(sites_left, 0, -1):
            ok = self.allowed(left, np.asarray([remaining]))[0]
            c = int(self.choices[np.argmax(ok)])
            bits.append(c)
            remaining -= c
        self._completions[key] = bits
        return bits


class SearchRecord:
    """The mutable per-example record of a search over ``n`` examples, ``num_sites`` sites.

    Attributes: ``state`` int ``[n]`` (codes of :data:`~ptq_adversary.audit.STATES`, or
    :data:`~ptq_adversary.audit.certificates.OPEN`), ``bits`` int32 ``[n, L]``, ``worst_loss``
    float32 ``[n]``, ``nodes`` int64 ``[n]``, ``bounded`` and ``pruned_at`` int64 ``[L]`` per
    depth, and the ``leaves`` count, as in :class:`~ptq_adversary.audit.CertifyResult`.
    """

    def __init__(self, n: int, num_sites: int):
        self.state = np.full(n, OPEN, np.int64)
        self.bits = np.full((n, num_sites), -1, np.int32)
        self.worst_loss = np.full(n, -np.inf, np.float32)
        self.nodes = np.zeros(n, np.int64)
        self.leaves = 0
        self.timed_out = False
        self.bounded = np.zeros(num_sites, np.int64)  # nodes bounded per depth
        self.pruned_at = np.zeros(num_sites, np.int64)  # ... and certified
        self.decided: list[bool | None] = [None] * num_sites  # bounds="auto": bound depth k?
        self.timer: dict = {}  # warm seconds and rows per compiled step

    def pays(self, step, k: int, saved: list, qfn) -> bool:
        """``bounds="auto"``: whether bounding depth ``k`` saves more than it costs.

        From the probe: the share of nodes certified times the leaves each certified node
        removes (counted exactly from the budget), times the time of a leaf from depth
        ``k + 1`` (the full-pass candidate leaves' time scaled by the FLOPs share of the
        sites left), against the time of a bound. Without timings (no candidates, a probe
        too small to time): bound while at least :data:`MIN_PRUNE_RATE` of the probe was
        certified.
        """
        rows = self.bounded[k]
        rate = self.pruned_at[k] / max(rows, 1)
        t_bound = self.timer.get(step)
        t_leaf = self.timer.get(compiled_step(qfn, "leaf", 0))
        if t_bound is None or t_leaf is None or not t_bound[1] or not t_leaf[1]:
            return bool(rate >= MIN_PRUNE_RATE)
        share = sum(site.flops_share for site in qfn.sites[k:]) or 1.0
        leaf_s = t_leaf[0] / t_leaf[1] * min(1.0, share)
        saving = (np.sum(saved) / max(rows, 1)) * leaf_s
        return bool(saving > t_bound[0] / t_bound[1])

    def record_leaves(self, ex: np.ndarray, bits: np.ndarray, loss, correct) -> None:
        """Leaves of examples ``ex`` (global indices, possibly repeated) evaluated exactly."""
        loss, correct = np.asarray(loss, np.float32), np.asarray(correct, bool)
        self.leaves += len(ex)
        order = np.lexsort((-loss, correct))  # misclassifying first, then by loss
        for i in order:  # first occurrence per example wins
            e = ex[i]
            if self.state[e] == BROKEN:
                continue
            if not correct[i]:
                self.state[e] = BROKEN
                self.bits[e] = bits[i]
                self.worst_loss[e] = max(self.worst_loss[e], loss[i])
            elif loss[i] > self.worst_loss[e]:
                self.worst_loss[e] = loss[i]
                self.bits[e] = bits[i]
