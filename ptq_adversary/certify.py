r"""Certify the worst case of dynamic PTQ: sound bounds and branch and bound over allocations.

A search (random, greedy, beam, a learned policy) finds allocations that break inputs: an
*upper* bound on the accuracy under the worst allocation. :func:`certify` also proves the other
side: for each example, that **no** budget-feasible allocation misclassifies it, or an
allocation that does, or (within its node and time limits) neither.

The search space is the prefix tree of allocations over the program's cuts
(:meth:`transform.QuantizedFn.run_segments`): a node at depth ``k`` fixes the bits of sites
``0..k-1``, and its values live at the cut before site ``k``'s quantizer are computed exactly,
as the prefix-shared enumeration computes them. At a node

* the remaining sites may take every bit-width the remaining budget allows them; interval
  bounds through the rest of the program (:meth:`transform.QuantizedFn.bound_segments`) enclose
  the logits for all of them at once, and the node is **certified** (its subtree pruned) when
  the true class's lower bound exceeds every other class's upper bound;
* otherwise its children (one per feasible bit-width of site ``k``) are computed. A node whose
  remaining bits are forced by the budget (always the last site, under an exact budget) is a
  **leaf**: its allocation is evaluated exactly, and an example is **broken** as soon as one
  leaf misclassifies it; its other nodes are dropped.

Before the tree, ``candidates`` (e.g. the allocations the audit's searches found, and the
uniform and low-bit allocations) are evaluated as leaves, so that most breakable examples end
before any branching. The tree is searched breadth first, every node of a depth (over all
examples) in the same batched calls, the bits being data (one compile per depth).

Each example ends in one of :data:`STATES`: ``certified`` (no feasible allocation
misclassifies it: a proof, up to the soundness of the bounds, which the tests check against
enumeration), ``broken`` (with the allocation) or ``unknown`` (node or time limit reached).
``certified_accuracy`` is then a sound lower bound of the accuracy under the worst allocation,
``accuracy`` (correct under every allocation evaluated) an upper bound; they meet when no
example is unknown.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from ptq_adversary import policy
from ptq_adversary.models import QuantizedModel

__all__ = ["STATES", "CertifyResult", "certify", "default_candidates"]

#: Per-example outcome, indexed by :attr:`CertifyResult.state`.
STATES = ("certified", "broken", "unknown")
_CERTIFIED, _BROKEN, _UNKNOWN, _OPEN = 0, 1, 2, 3

#: ``bounds="auto"``: nodes of a depth bounded before deciding whether bounding that depth
#: pays (:meth:`_Out.pays`), and the share of them that must be certified for bounds to stay
#: on there when no timing is available.
PROBE_NODES = 128
MIN_PRUNE_RATE = 0.05


@dataclasses.dataclass(frozen=True)
class CertifyResult:
    """What :func:`certify` proved and found (numpy arrays over ``B`` examples, ``L`` sites).

    Attributes:
      state: int8 ``[B]``, an index into :data:`STATES`.
      bits: int32 ``[B, L]``: for a broken example a misclassifying allocation; otherwise the
        highest-loss allocation evaluated (``-1`` where no leaf was evaluated).
      worst_loss: float32 ``[B]``: the largest cross-entropy among the leaves evaluated
        (``-inf`` where none was).
      nodes: int64 ``[B]``: nodes evaluated per example (exact segment runs: root, inner
        nodes, leaves and candidates).
      bound_calls: nodes bounded (one interval pass each).
      pruned: nodes certified, whose subtrees were never evaluated.
      leaves: full allocations evaluated exactly.
      seconds: wall time.
      stopped: ``""``, or why some examples are unknown (``"node limit"``, ``"time limit"``).
      bounded_per_depth, pruned_per_depth: int64 ``[L]``: nodes bounded and certified at each
        depth (depth ``k``: sites ``0..k-1`` fixed).
    """

    state: np.ndarray
    bits: np.ndarray
    worst_loss: np.ndarray
    nodes: np.ndarray
    bound_calls: int
    pruned: int
    leaves: int
    seconds: float
    stopped: str = ""
    bounded_per_depth: np.ndarray | None = None
    pruned_per_depth: np.ndarray | None = None

    @property
    def certified_accuracy(self) -> float:
        """Share of examples proved correct under every feasible allocation (a lower bound)."""
        return float(np.mean(self.state == _CERTIFIED))

    @property
    def accuracy(self) -> float:
        """Share of examples no evaluated allocation misclassifies (an upper bound)."""
        return float(np.mean(self.state != _BROKEN))

    @property
    def exact(self) -> bool:
        """Whether the bracket is closed (no example unknown)."""
        return bool(np.all(self.state != _UNKNOWN))

    @property
    def broken(self) -> np.ndarray:
        """bool ``[B]``: examples some evaluated allocation misclassifies."""
        return self.state == _BROKEN

    def states(self) -> np.ndarray:
        """str ``[B]``: each example's state name."""
        return np.asarray(STATES)[self.state]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the bracket, its cost, and the per-example state."""
        return {
            "certified_accuracy": self.certified_accuracy,
            "accuracy": self.accuracy,
            "exact": self.exact,
            "nodes": int(self.nodes.sum()),
            "bound_calls": int(self.bound_calls),
            "pruned": int(self.pruned),
            "leaves": int(self.leaves),
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "bounded_per_depth": _ints(self.bounded_per_depth),
            "pruned_per_depth": _ints(self.pruned_per_depth),
            "states": {name: int(np.sum(self.state == i)) for i, name in enumerate(STATES)},
            "state": self.states().tolist(),
        }


def _ints(a) -> list[int] | None:
    return None if a is None else [int(v) for v in a]


def default_candidates(budget: policy.Budget) -> np.ndarray:
    """The leaves tried before branching when none are given: the uniform allocation and the
    low-bit starts (each site alone at its lowest feasible choice): int ``[1 + S, L]`` bits."""
    idx = np.concatenate([np.asarray(policy.uniform_allocation(budget))[None],
                          policy.low_bit_starts(budget)])  # fmt: skip
    return np.unique(np.asarray(policy.to_bits(idx, budget), np.int32), axis=0)


# ------------------------------------------------------------------------ compiled steps
@functools.lru_cache(maxsize=256)
def _step(qfn, kind: str, start: int, choices: tuple[int, ...] = (), total: int = 0):
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


def _batched(fn, state, live, index: np.ndarray, bits: np.ndarray, labels, chunk: int, deadline,
             timer: dict | None = None):  # fmt: skip
    """``fn`` on the rows ``live[index]`` with ``bits`` (numpy ``[N, L]``) and ``labels``
    (numpy ``[N]`` or ``None``), in padded chunks.

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


# ------------------------------------------------------------------------ the search
class _Budget:
    """Feasibility tables of a budget: allowed bits, smallest bit, forced completions."""

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


def certify(
    model: QuantizedModel,
    images: ArrayLike,
    labels: ArrayLike,
    budget: policy.Budget,
    *,
    candidates: ArrayLike | None = None,
    bounds: bool | str = "auto",
    relaxation: str = "linear",
    node_limit: int | None = None,
    time_limit: float | None = None,
    example_chunk: int = 512,
    row_chunk: int = 256,
    progress: bool = False,
) -> CertifyResult:
    """Branch and bound over the bit allocations of a budget: per example, certified robust,
    broken, or unknown.

    Args:
      model: a :class:`~ptq_adversary.models.QuantizedModel` (any network through
        :func:`~ptq_adversary.models.as_quantized_model`).
      images: float ``[B, ...]`` as the model expects them; labels: int ``[B]``.
      budget: the :class:`~ptq_adversary.policy.Budget` (choices, sites, exact mean).
      candidates: int bits tried as leaves first: ``[M, L]`` (the same for every example) or
        ``[M, B, L]`` (per example, e.g. what searches found); default
        :func:`default_candidates`.
      bounds: bound inner nodes and prune the certified ones. ``False``: the tree is searched
        down to every leaf of an unbroken example (the exact answer by break-pruning alone);
        ``"auto"`` (default): at each depth the first :data:`PROBE_NODES` nodes are bounded,
        and bounding stays on at that depth only if the subtrees it pruned there would have
        cost more to evaluate than the bounds cost (measured; bounds that certify little
        only cost time).
      relaxation: ``"linear"`` (default): interval bounds tightened by a CROWN-style linear
        relaxation, the node's first site split over its choices and the budget coupled
        across sites (:meth:`~ptq_adversary.transform.QuantizedFn.bound_margins`);
        ``"interval"``: interval bounds alone (IBP), cheaper and looser.
      node_limit: most nodes per example (its state is ``unknown`` past it).
      time_limit: seconds; open examples are ``unknown`` once it is reached.
      example_chunk: examples searched together (memory: a depth's live values).
      row_chunk: nodes per compiled call.
      progress: a progress bar over example chunks.

    Returns:
      A :class:`CertifyResult`.
    """
    if relaxation not in ("linear", "interval"):
        raise ValueError(f"relaxation must be 'linear' or 'interval', got {relaxation!r}")
    if bounds not in (True, False, "auto"):
        raise ValueError(f"bounds must be True, False or 'auto', got {bounds!r}")
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + float(time_limit)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n, num_sites = len(labels), budget.num_sites
    qfn, state = model.program()
    if qfn.num_sites != num_sites:
        raise ValueError(f"budget has {num_sites} sites, the model {qfn.num_sites}")
    cands = default_candidates(budget) if candidates is None else np.asarray(candidates, np.int32)
    if cands.ndim == 2 and cands.shape[1] == num_sites:
        cands = np.broadcast_to(cands[:, None], (len(cands), n, num_sites))
    if cands.ndim != 3 or cands.shape[1:] != (n, num_sites):
        raise ValueError(
            f"candidates must be [M, L] or [M, B={n}, L={num_sites}], got {cands.shape}"
        )
    ok = np.isin(cands, budget.choices).all(axis=-1) & (cands.sum(axis=-1) == budget.total)
    if not ok.all():
        bad = cands[~ok][0].tolist()
        raise ValueError(
            f"candidates must be feasible allocations (bits in {list(budget.choices)} summing to "
            f"{budget.total}); got {bad}"
        )
    tables = _Budget(budget)
    out = _Out(n, num_sites)
    chunks = range(0, n, example_chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="certify", unit="ex")
    for e0 in chunks:
        sl = slice(e0, min(e0 + example_chunk, n))
        _search(qfn, state, images[sl], labels[sl], cands[:, sl], tables, out, sl, bounds,
                relaxation, node_limit, deadline, row_chunk)  # fmt: skip
        if bar is not None:
            bar.update(sl.stop - sl.start)
            bar.set_postfix(certified=int((out.state == _CERTIFIED).sum()),
                            broken=int((out.state == _BROKEN).sum()))  # fmt: skip
    if bar is not None:
        bar.close()
    stopped = ""
    if (out.state == _UNKNOWN).any():
        stopped = "time limit" if out.timed_out else "node limit"
    return CertifyResult(
        state=out.state.astype(np.int8),
        bits=out.bits,
        worst_loss=out.worst_loss,
        nodes=out.nodes,
        bound_calls=int(out.bounded.sum()),
        pruned=int(out.pruned_at.sum()),
        bounded_per_depth=out.bounded,
        pruned_per_depth=out.pruned_at,
        leaves=out.leaves,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
    )


class _Out:
    """The mutable per-example record of a search."""

    def __init__(self, n: int, num_sites: int):
        self.state = np.full(n, _OPEN, np.int64)
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
        t_leaf = self.timer.get(_step(qfn, "leaf", 0))
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
            if self.state[e] == _BROKEN:
                continue
            if not correct[i]:
                self.state[e] = _BROKEN
                self.bits[e] = bits[i]
                self.worst_loss[e] = max(self.worst_loss[e], loss[i])
            elif loss[i] > self.worst_loss[e]:
                self.worst_loss[e] = loss[i]
                self.bits[e] = bits[i]


def _search(qfn, state, x, y, cands, tables: _Budget, out: _Out, sl: slice, bounds,
            relaxation: str, node_limit, deadline, chunk: int) -> None:  # fmt: skip
    """Branch and bound for the examples ``sl`` (``x``, ``y``, ``cands [M, E, L]``)."""
    num_sites, e0 = tables.L, sl.start
    local = np.arange(len(y))
    glob = local + e0

    def stop_all() -> None:
        open_ = out.state[sl] == _OPEN
        out.state[sl][open_] = _UNKNOWN
        out.timed_out = True

    # candidates: full allocations as leaves on the images
    for cand in cands:
        rows = local[out.state[glob] == _OPEN]
        if not len(rows):
            return
        res = _batched(_step(qfn, "leaf", 0), state, x, rows, cand[rows], y[rows], chunk,
                       deadline, out.timer)  # fmt: skip
        if res is None:
            return stop_all()
        out.nodes[glob[rows]] += 1
        out.record_leaves(glob[rows], cand[rows], *res)

    # the root: segment 0 (no bits) for every open example
    rows = local[out.state[glob] == _OPEN]
    if not len(rows):
        return
    zeros = np.zeros((len(rows), num_sites), np.int32)
    live = _batched(_step(qfn, "seg", 0), state, x, rows, zeros, None, chunk, deadline)
    if live is None:
        return stop_all()
    out.nodes[glob[rows]] += 1
    ex = rows  # the example (local index) of each node at this depth
    prefix = zeros  # [N, L]: bits of the fixed sites (the rest 0)
    remaining = np.full(len(rows), tables.budget.total, np.int64)

    for k in range(num_sites):
        keep = out.state[glob[ex]] == _OPEN  # examples broken or stopped lose their nodes
        idx = np.flatnonzero(keep)
        use = bounds if bounds != "auto" else out.decided[k]
        if use is not False and len(idx):
            key = (tuple(int(c) for c in tables.choices), int(tables.budget.total))
            step = _step(qfn, relaxation, k + 1, *(key if relaxation == "linear" else ()))
            half = PROBE_NODES // 2  # two probe calls of one shape: the second one is timed
            parts = [idx[:half], idx[half:PROBE_NODES], idx[PROBE_NODES:]] if use is None else [idx]
            saved = []
            for j, part in enumerate(parts):
                if not len(part):
                    continue
                bits = prefix[part].copy()
                bits[:, k:] = tables.smallest(num_sites - k, remaining[part])[:, None]
                margin = _batched(step, state, live, part, bits, y[ex[part]], chunk, deadline,
                                  out.timer)  # fmt: skip
                if margin is None:
                    return stop_all()
                safe = np.asarray(margin) > 0
                out.bounded[k] += len(part)
                out.pruned_at[k] += int(safe.sum())
                keep[part[safe]] = False
                saved.extend(tables.counts[num_sites - k, remaining[part[safe]]])
                if use is None and j == 1:  # auto: decide for this depth from the probe
                    out.decided[k] = out.pays(step, k, saved, qfn)
                    if not out.decided[k]:
                        break
        # children: every feasible bit-width of site k
        ok = tables.allowed(num_sites - k, remaining) & keep[:, None]
        parent, which = np.nonzero(ok)
        c = tables.choices[which]
        if node_limit is not None and len(parent):
            per_ex = np.bincount(ex[parent], minlength=len(y))
            over = out.nodes[glob] + per_ex > node_limit
            over &= out.state[glob] == _OPEN
            if over.any():
                out.state[glob[over]] = _UNKNOWN
                alive = ~over[ex[parent]]
                parent, c = parent[alive], c[alive]
        if not len(parent):
            break
        child_ex = ex[parent]
        child_prefix = prefix[parent].copy()
        child_prefix[:, k] = c
        child_rem = remaining[parent] - c
        sites_left = num_sites - k - 1
        leaf = (
            np.ones(len(parent), bool) if sites_left == 0 else tables.forced(sites_left, child_rem)
        )
        if leaf.any():
            li = np.flatnonzero(leaf)
            full = child_prefix[li].copy()
            for j, i in enumerate(li):
                if sites_left:
                    full[j, k + 1 :] = tables.completion(sites_left, int(child_rem[i]))
            # Rounds: each open example's next 1, 1, 2, 4, ... leaves, the most uneven
            # allocations first (breaking ones concentrate the cut on few sites), so that a
            # breakable example stops at its first misclassifying leaf.
            spread = -np.var(full.astype(np.float64), axis=1)
            order = np.lexsort((spread, child_ex[li]))
            li, full = li[order], full[order]
            rank = np.arange(len(li)) - np.searchsorted(child_ex[li], child_ex[li])
            done, size = 0, 1
            while done < rank.max(initial=-1) + 1:
                sel = (rank >= done) & (rank < done + size)
                sel &= out.state[glob[child_ex[li]]] == _OPEN
                done, size = done + size, size if done == 0 else 2 * size
                if not sel.any():
                    continue
                rows = np.flatnonzero(sel)
                res = _batched(_step(qfn, "leaf", k + 1), state, live, parent[li[rows]],
                               full[rows], y[child_ex[li[rows]]], chunk, deadline)  # fmt: skip
                if res is None:
                    return stop_all()
                np.add.at(out.nodes, glob[child_ex[li[rows]]], 1)
                out.record_leaves(glob[child_ex[li[rows]]], full[rows], *res)
        inner = np.flatnonzero(~leaf & (out.state[glob[child_ex]] == _OPEN))
        if not len(inner):
            ex = np.zeros(0, np.int64)
            break
        new_live = _batched(_step(qfn, "seg", k + 1), state, live, parent[inner],
                            child_prefix[inner], None, chunk, deadline)  # fmt: skip
        if new_live is None:
            return stop_all()
        np.add.at(out.nodes, glob[child_ex[inner]], 1)
        live, ex = new_live, child_ex[inner]
        prefix, remaining = child_prefix[inner], child_rem[inner]
    # every node of an example still open was certified or evaluated to a correct leaf
    done = out.state[sl] == _OPEN
    out.state[glob[done]] = _CERTIFIED
