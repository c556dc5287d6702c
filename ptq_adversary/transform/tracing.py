"""Tracing ``fn`` into a flat program, and locating the batch axis of a batched trace.

:func:`flatten` traces ``fn(params, x)`` at one input shape and flattens it with a
:class:`~ptq_adversary.transform.program.Builder`, dropping the numbers of sites the output
does not depend on. :func:`batch_axes` compares a trace at batch ``B`` with the per-example
reference: where they are the same program and every site's batch axis is found, the batched
program can run without ``jax.vmap`` (see
:meth:`~ptq_adversary.transform.QuantizedFn.batched_program`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ptq_adversary.transform import shim
from ptq_adversary.transform.program import Builder, Lit, Program, dead_sites

__all__ = ["batch_axes", "flatten"]


def flatten(fn, treedef, avals, x_aval, options):
    """Traces ``fn`` at ``x_aval`` and flattens it.

    Args:
      fn: ``fn(params, x) -> output pytree``; treedef, avals: the params' tree structure and
        its leaves' ``ShapeDtypeStruct`` s; x_aval: ``[B, ...]`` the input's.
      options: ``(activation_products, quantize_first)``, the :class:`Builder` arguments.

    Returns:
      ``(builder, ops, param_ids, x_id, out_refs, out_tree, dead_sites)`` with the sites that
      do not reach the output unnumbered (``ops``: the builder's ops, sites renumbered).

    Raises:
      ValueError: an output without a leading batch axis of size ``B``.
    """
    out_tree_box = []

    def flat_fn(leaf_list, xi):
        out = fn(jax.tree.unflatten(treedef, leaf_list), xi)
        flat, tree = jax.tree.flatten(out)
        out_tree_box.append(tree)
        return flat

    closed = shim.trace(flat_fn, avals, x_aval)
    builder = Builder(*options)
    param_ids = [builder.new(a, False, False) for a in avals]
    x_id = builder.new(x_aval, True, False)
    out_refs = builder.add(closed, [*param_ids, x_id], "")
    batch = x_aval.shape[0]
    for r in out_refs:
        shape = (batch,) if isinstance(r, Lit) else builder.avals[r].shape
        if not shape or shape[0] != batch:
            raise ValueError(
                f"every output of fn must have a leading batch axis; traced at batch {batch} an "
                f"output has shape {tuple(shape)}"
            )
    dead = dead_sites(builder.ops, out_refs, builder.num_sites)
    ops = list(builder.ops)
    if dead:  # renumber: a site the output does not depend on is no site
        keep = sorted(set(range(builder.num_sites)) - dead)
        renum = {old: new for new, old in enumerate(keep)}
        ops = [
            dataclasses.replace(op, site=renum.get(op.site)) if op.site is not None else op
            for op in ops
        ]
    return builder, ops, param_ids, x_id, out_refs, out_tree_box[-1], dead


def _out_batch_axis(eqn: Any, data: tuple[int, ...], in_axes, ndims) -> int | None:
    """Where the data operands' batch axis lands in a conv/dot's output (``None``: nowhere)."""
    if shim.is_conv(eqn):
        dn = eqn.params["dimension_numbers"]
        return dn.out_spec[0] if data == (0,) and in_axes[0] == dn.lhs_spec[0] else None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_free = [k for k in range(ndims[0]) if k not in lc and k not in lb]
    found = set()
    for d, a in zip(data, in_axes, strict=True):
        contract, batch = (lc, lb) if d == 0 else (rc, rb)
        if a in contract:
            return None
        if a in batch:
            found.add(list(batch).index(a))
            continue
        free = [k for k in range(ndims[d]) if k not in contract and k not in batch]
        found.add(len(lb) + (0 if d == 0 else len(lhs_free)) + free.index(a))
    return found.pop() if len(found) == 1 else None


def batch_axes(reference: Program, ops_b, avals_b, batch: int):
    """Per site op of the batch-``B`` program: the batch axis of each data operand and of the
    output, or ``None`` (then the per-example program is vmapped instead).

    The two traces must be the same program (same primitives in the same order, the same
    sites); a data operand's batch axis is the one axis whose size is 1 at batch 1 and ``B``
    at batch ``B``, every other axis equal.

    Args:
      reference: the per-example program; ops_b, avals_b: the batch-``B`` trace's ops and
        value avals (from :func:`flatten`).

    Returns:
      ``{op index: (batch axis of each data operand, output batch axis)}`` or ``None``.
    """
    ops_1, avals_1 = reference.ops, reference.avals
    if batch < 2 or len(ops_1) != len(ops_b):
        return None
    axes: dict[int, tuple[tuple[int, ...], int]] = {}
    for i, (a, b) in enumerate(zip(ops_1, ops_b, strict=True)):
        if a.eqn.primitive is not b.eqn.primitive or a.site != b.site or a.data != b.data:
            return None
        if b.site is None:
            continue
        found = []
        for d in b.data:
            s1, sb = avals_1[a.ins[d]].shape, avals_b[b.ins[d]].shape
            if len(s1) != len(sb):
                return None
            diff = [k for k, (u, v) in enumerate(zip(s1, sb, strict=True)) if u != v]
            if len(diff) != 1 or s1[diff[0]] != 1 or sb[diff[0]] != batch:
                return None
            found.append(diff[0])
        ndims = [len(avals_b[r].shape) if not isinstance(r, Lit) else 0 for r in b.ins[:2]]
        out_axis = _out_batch_axis(b.eqn, b.data, found, ndims)
        if out_axis is None:
            return None
        axes[i] = (tuple(found), out_axis)
    return axes
