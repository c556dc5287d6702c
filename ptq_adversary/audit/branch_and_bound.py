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

Each example ends in one of :data:`~ptq_adversary.audit.STATES`: ``certified`` (no feasible
allocation misclassifies it: a proof, up to the soundness of the bounds, which the tests check
against enumeration), ``broken`` (with the allocation) or ``unknown`` (node or time limit
reached). ``certified_accuracy`` is then a sound lower bound of the accuracy under the worst
allocation, ``accuracy`` (correct under every allocation evaluated) an upper bound; they meet
when no example is unknown. The nodes' evaluation and record: :mod:`ptq_adversary.audit.nodes`.
"""

from __future__ import annotations

import time

import numpy as np
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from ptq_adversary import policy
from ptq_adversary.audit.certificates import (
    BROKEN,
    CERTIFIED,
    OPEN,
    UNKNOWN,
    CertifyResult,
    default_candidates,
)
from ptq_adversary.audit.nodes import (
    PROBE_NODES,
    BudgetTables,
    SearchRecord,
    compiled_step,
    run_batched,
)
from ptq_adversary.models import QuantizedModel

__all__ = ["certify"]


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
    tables = BudgetTables(budget)
    out = SearchRecord(n, num_sites)
    chunks = range(0, n, example_chunk)
    bar = None
    if progress:
        bar = tqdm(total=n, desc="certify", unit="ex")
    for e0 in chunks:
        sl = slice(e0, min(e0 + example_chunk, n))
        _search(qfn, state, images[sl], labels[sl], cands[:, sl], tables, out, sl, bounds,
                relaxation, node_limit, deadline, row_chunk)  # fmt: skip
        if bar is not None:
            bar.update(sl.stop - sl.start)
            bar.set_postfix(certified=int((out.state == CERTIFIED).sum()),
                            broken=int((out.state == BROKEN).sum()))  # fmt: skip
    if bar is not None:
        bar.close()
    stopped = ""
    if (out.state == UNKNOWN).any():
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


def _search(qfn, state, x, y, cands, tables: BudgetTables, out: SearchRecord, sl: slice, bounds,
            relaxation: str, node_limit, deadline, chunk: int) -> None:  # fmt: skip
    """Branch and bound for the examples ``sl`` (``x``, ``y``, ``cands [M, E, L]``)."""
    num_sites, e0 = tables.L, sl.start
    local = np.arange(len(y))
    glob = local + e0

    def stop_all() -> None:
        open_ = out.state[sl] == OPEN
        out.state[sl][open_] = UNKNOWN
        out.timed_out = True

    # candidates: full allocations as leaves on the images
    for cand in cands:
        rows = local[out.state[glob] == OPEN]
        if not len(rows):
            return
        res = run_batched(compiled_step(qfn, "leaf", 0), state, x, rows, cand[rows], y[rows],
                          chunk, deadline, out.timer)  # fmt: skip
        if res is None:
            return stop_all()
        out.nodes[glob[rows]] += 1
        out.record_leaves(glob[rows], cand[rows], *res)

    # the root: segment 0 (no bits) for every open example
    rows = local[out.state[glob] == OPEN]
    if not len(rows):
        return
    zeros = np.zeros((len(rows), num_sites), np.int32)
    live = run_batched(compiled_step(qfn, "seg", 0), state, x, rows, zeros, None, chunk, deadline)
    if live is None:
        return stop_all()
    out.nodes[glob[rows]] += 1
    ex = rows  # the example (local index) of each node at this depth
    prefix = zeros  # [N, L]: bits of the fixed sites (the rest 0)
    remaining = np.full(len(rows), tables.budget.total, np.int64)

    for k in range(num_sites):
        keep = out.state[glob[ex]] == OPEN  # examples broken or stopped lose their nodes
        idx = np.flatnonzero(keep)
        use = bounds if bounds != "auto" else out.decided[k]
        if use is not False and len(idx):
            key = (tuple(int(c) for c in tables.choices), int(tables.budget.total))
            extra = key if relaxation == "linear" else ()
            step = compiled_step(qfn, relaxation, k + 1, *extra)
            half = PROBE_NODES // 2  # two probe calls of one shape: the second one is timed
            parts = [idx[:half], idx[half:PROBE_NODES], idx[PROBE_NODES:]] if use is None else [idx]
            saved = []
            for j, part in enumerate(parts):
                if not len(part):
                    continue
                bits = prefix[part].copy()
                bits[:, k:] = tables.smallest(num_sites - k, remaining[part])[:, None]
                margin = run_batched(step, state, live, part, bits, y[ex[part]], chunk,
                                     deadline, out.timer)  # fmt: skip
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
            over &= out.state[glob] == OPEN
            if over.any():
                out.state[glob[over]] = UNKNOWN
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
                sel &= out.state[glob[child_ex[li]]] == OPEN
                done, size = done + size, size if done == 0 else 2 * size
                if not sel.any():
                    continue
                rows = np.flatnonzero(sel)
                res = run_batched(compiled_step(qfn, "leaf", k + 1), state, live,
                                  parent[li[rows]], full[rows], y[child_ex[li[rows]]], chunk,
                                  deadline)  # fmt: skip
                if res is None:
                    return stop_all()
                np.add.at(out.nodes, glob[child_ex[li[rows]]], 1)
                out.record_leaves(glob[child_ex[li[rows]]], full[rows], *res)
        inner = np.flatnonzero(~leaf & (out.state[glob[child_ex]] == OPEN))
        if not len(inner):
            ex = np.zeros(0, np.int64)
            break
        new_live = run_batched(compiled_step(qfn, "seg", k + 1), state, live, parent[inner],
                               child_prefix[inner], None, chunk, deadline)  # fmt: skip
        if new_live is None:
            return stop_all()
        np.add.at(out.nodes, glob[child_ex[inner]], 1)
        live, ex = new_live, child_ex[inner]
        prefix, remaining = child_prefix[inner], child_rem[inner]
    # every node of an example still open was certified or evaluated to a correct leaf
    done = out.state[sl] == OPEN
    out.state[glob[done]] = CERTIFIED
