"""Linear (CROWN-style) lower bounds of logit margins over the allocations that meet a budget.

A backward pass over the tape of an interval pass
(:func:`~ptq_adversary.transform.bounds.bound_segments`) propagates the margin as a linear
function of the program's values; the per-site, per-bit-choice terms it collects are minimised
*jointly* under the exact remaining bit budget. :func:`margin_bounds` combines it with the plain
interval bound (the larger of the two, both sound) for
:meth:`~ptq_adversary.transform.QuantizedFn.bound_margins`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ptq_adversary import quant
from ptq_adversary.transform import shim
from ptq_adversary.transform.bounds import bound_segments, quant_error
from ptq_adversary.transform.intervals import Box, ends, roundoff
from ptq_adversary.transform.program import Program

__all__ = ["margin_bounds"]


# Affine in their box operands (the others exact): the backward pass is their transpose.
_AFFINE = {
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "concatenate", "pad", "rev", "reduce_sum", "reduce_window_sum",
    "cumsum", "copy", "copy_p", "dynamic_slice", "gather", "dynamic_update_slice",
}  # fmt: skip


def _is_affine(eqn, vals) -> bool:
    name = eqn.primitive.name
    boxes = [isinstance(v, Box) for v in vals]
    if name in _AFFINE:
        return True
    if name == "convert_element_type":
        return jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)
    if name == "select_n":
        return not boxes[0]
    if name in ("mul", "dot_general", "conv_general_dilated"):
        return sum(boxes) == 1
    if name == "div":
        return boxes[0] and not boxes[1]
    return False


def _dot(lam, v) -> jax.Array:
    """``<lam[k], v>`` for every row ``k``: ``lam [K, *s]``, ``v`` broadcastable to ``s``."""
    v = jnp.broadcast_to(v, lam.shape[1:])
    return jnp.sum((lam * v).reshape(lam.shape[0], -1), axis=1)


def _linear_bound(tape: list, out, spec, choices: tuple[int, ...], remaining, first_site: int,
                  num_sites: int):  # fmt: skip
    """CROWN-style lower bounds of ``spec @ out`` over every allocation of the remaining sites.

    A backward pass over the recorded interval pass: affine operations are transposed exactly
    (``jax.vjp``), ``max(x, c)`` (ReLU) is relaxed by two lines from the interval of ``x``
    (the chord above; below ``x`` or ``c``, whichever is closer), other nonlinear operations
    are replaced by their interval (concretized). A quantizer contributes per bit choice: the
    exact quantized values where its input is exact, else its error bound ``[-delta, delta]``
    (sign-clamped). The per-site, per-choice terms are then minimised *jointly* over the
    allocations that meet the remaining budget exactly (a min-plus dynamic program over
    sites and bit sums), instead of each site at its worst choice.

    Args:
      tape: from :func:`~ptq_adversary.transform.bounds.bound_segments`; out: its output box
        (``[1, C]`` logits); spec: ``[K, 1, C]``.
      choices: the bit choices; remaining: int scalar, the bits left for sites
        ``first_site..num_sites-1``.

    Returns:
      ``[K]`` lower bounds, made smaller by a relative margin for the float error of the pass.
    """
    k_rows = spec.shape[0]
    lam: dict[int, Any] = {id(out): spec}
    bias = jnp.zeros((k_rows,), spec.dtype)
    mag = jnp.zeros((k_rows,), spec.dtype)  # sum of |terms|, for the float-error margin
    terms: dict[int, jax.Array] = {}  # site -> [K, len(choices)]

    def add(obj, g):
        lam[id(obj)] = lam[id(obj)] + g if id(obj) in lam else g

    def concretize(box, g):
        nonlocal bias, mag
        lo, hi = ends(box)
        bias = bias + _dot(jnp.maximum(g, 0), lo) + _dot(jnp.minimum(g, 0), hi)
        mag = mag + _dot(jnp.abs(g), jnp.maximum(jnp.abs(lo), jnp.abs(hi)))

    for entry in reversed(tape):
        kind = entry[0]
        if kind == "split":  # exact runs of the first segment, one per choice
            _, site, boxes, allowed = entry
            cols = jnp.zeros((k_rows, len(choices)), spec.dtype)
            for box, vs in boxes:
                g = lam.pop(id(box), None)
                if g is None:
                    continue
                col = jnp.stack([_dot(g, v) for v in vs], axis=1)
                cols = cols + col
                mag = mag + jnp.max(jnp.abs(col), axis=1)
            terms[site] = jnp.where(jnp.asarray(allowed)[None], cols, jnp.inf)
            continue
        if kind in ("quant", "hull"):
            _, site, x, xq = entry
            g = lam.pop(id(xq), None)
            if g is None:
                continue
            cols = []
            if kind == "hull":
                for b in choices:
                    xb = quant.fake_quant_activation(x, jnp.asarray(b, jnp.int32))
                    cols.append(_dot(g, xb))
                    mag = mag + _dot(jnp.abs(g), jnp.abs(xb)) / len(choices)
            else:
                add(x, g)
                lo, hi = ends(x)
                for b in choices:
                    delta = quant_error(x, jnp.asarray(b, jnp.int32))
                    e_lo = jnp.where(lo >= 0, jnp.maximum(-delta, -hi), -delta)
                    e_hi = jnp.where(hi <= 0, jnp.minimum(delta, -lo), delta)
                    cols.append(_dot(jnp.maximum(g, 0), e_lo) + _dot(jnp.minimum(g, 0), e_hi))
            terms[site] = terms.get(site, 0) + jnp.stack(cols, axis=1)
            continue
        _, eqn, vals, outs = entry
        gs = [lam.pop(id(o), None) for o in outs]
        if all(g is None for g in gs):
            continue
        name = eqn.primitive.name
        pos = [i for i, v in enumerate(vals) if isinstance(v, Box)]
        if _is_affine(eqn, vals):

            def f(*boxes, eqn=eqn, vals=vals, pos=pos):
                full = list(vals)
                for i, b in zip(pos, boxes, strict=True):
                    full[i] = b
                return shim.bind(eqn, full)

            zeros = [jnp.zeros_like(vals[i].lo) for i in pos]
            outs0, vjp = jax.vjp(f, *zeros)
            cots = [
                jnp.zeros((k_rows, *o.shape), o.dtype) if g is None else g
                for g, o in zip(gs, outs0, strict=True)
            ]
            for g, o0 in zip(cots, outs0, strict=True):
                bias = bias + _dot(g, o0)
                mag = mag + _dot(jnp.abs(g), jnp.abs(o0))
            grads = jax.vmap(lambda *c, vjp=vjp: vjp(list(c)))(*cots)
            for i, g in zip(pos, grads, strict=True):
                add(vals[i], g)
            continue
        g = gs[0]
        if name == "max" and len(pos) == 1 and len(outs) == 1:
            x, c = vals[pos[0]], vals[1 - pos[0]]
            c = jnp.broadcast_to(jnp.asarray(c, x.lo.dtype), x.lo.shape)
            lp, up = x.lo - c, x.hi - c
            active, inactive = lp >= 0, up <= 0
            unstable = ~active & ~inactive
            slope = jnp.where(unstable, up / jnp.where(unstable, up - lp, 1.0), active * 1.0)
            upper_b = jnp.where(unstable, c - slope * x.lo, jnp.where(active, 0.0, c))
            alpha = jnp.where(unstable, (up > -lp) * 1.0, active * 1.0)
            lower_b = jnp.where(active, 0.0, c * (1 - alpha))
            gp, gn = jnp.maximum(g, 0), jnp.minimum(g, 0)
            add(x, gp * alpha + gn * slope)
            bias = bias + _dot(gp, lower_b) + _dot(gn, upper_b)
            mag = mag + _dot(jnp.abs(g), jnp.abs(lower_b) + jnp.abs(upper_b))
            continue
        for o, g in zip(outs, gs, strict=True):
            if g is not None:
                concretize(o, g)
    # (every box is made by a taped entry, so no gradient is left over here)
    # joint minimum of the site terms under the exact remaining budget
    sites = range(first_site, num_sites)
    cmax = max(choices)
    size = (num_sites - first_site) * cmax + 1
    inf = jnp.asarray(jnp.inf, spec.dtype)
    table = jnp.full((k_rows, size), inf).at[:, 0].set(0.0)
    for site in sites:
        t = terms.get(site, jnp.zeros((k_rows, len(choices)), spec.dtype))
        new = jnp.full_like(table, inf)
        for j, b in enumerate(choices):
            shifted = jnp.concatenate([jnp.full((k_rows, b), inf), table[:, : size - b]], axis=1)
            new = jnp.minimum(new, shifted + t[:, j : j + 1])
        table = new
        mag = mag + jnp.max(jnp.abs(jnp.where(jnp.isfinite(t), t, 0.0)), axis=1)
    best = jnp.take(table, jnp.clip(remaining, 0, size - 1), axis=1)
    return bias + best - 2.0**11 * roundoff(bias) * mag - 1e-6


def margin_bounds(
    program: Program,
    leaves,
    live,
    site_bits,
    label,
    remaining,
    start: int,
    choices: tuple[int, ...] | None,
    num_sites: int,
) -> jax.Array:
    """Lower bounds of one example's logit margins ``logit[y] - logit[j]`` (vmapped by the
    caller), from the exact values live at the cut before segment ``start`` to the logits.

    Args:
      program: the per-example program (one logits output ``[1, C]``); leaves: its parameter
        leaves; live: the example's values live at the cut (``start >= 1``).
      site_bits: int ``[L]``, each site's smallest allowed bit-width; label: int scalar.
      remaining: int scalar, the bits left for sites ``start - 1 ..``.
      choices: the static bit choices, or ``None`` for intervals alone (every site at its
        ``site_bits``; ``remaining`` is then unused).
      num_sites: ``L``.

    Returns:
      float ``[C]``: the larger of the interval and (with ``choices``) the linear bound;
      ``+inf`` at ``j == y``.
    """
    linear = choices is not None
    last = len(program.seg_ops) - 1
    tape: list | None = [] if linear else None
    split = None
    if linear:  # the first site's choices that leave a feasible rest (a superset)
        left = num_sites - start  # sites after the first
        cs = jnp.asarray(choices)
        allowed = (cs >= site_bits[start - 1]) & (remaining - cs >= left * min(choices))
        allowed &= remaining - cs <= left * max(choices)
        split = (choices, [allowed[j] for j in range(len(choices))])
    outs = bound_segments(program, leaves, live, site_bits, start, last, tape, split)
    if len(outs) != 1:
        raise ValueError("bound_margins needs fn to return one logits array")
    out = outs[0]
    lo, hi = ends(out) if linear else out
    num_classes = lo.shape[-1]
    onehot = jax.nn.one_hot(label, num_classes, dtype=lo.dtype)
    ibp = lo[0, label] - hi[0]
    if linear:
        spec = (onehot[None] - jnp.eye(num_classes, dtype=lo.dtype))[:, None, :]
        crown = _linear_bound(tape, out, spec, choices, remaining, start - 1, num_sites)
        ibp = jnp.maximum(ibp, jnp.where(jnp.isnan(crown), -jnp.inf, crown))
    ibp = jnp.where(jnp.isnan(ibp), -jnp.inf, ibp)
    return jnp.where(onehot > 0, jnp.inf, ibp)
