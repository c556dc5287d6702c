"""Interval bounds of segments of the quantized program over a set of allocations.

:func:`bound_segments` runs segments ``start..stop`` of a per-example
:class:`~ptq_adversary.transform.program.Program` on exact values and
:class:`~ptq_adversary.transform.intervals.Box` es: each site in them quantizes its data operand
with an error bounded for *every* bit-width of at least the given one (:func:`quant_error`;
the exact hull of the quantized values where the operand is exact), and everything downstream
is interval arithmetic (:mod:`~ptq_adversary.transform.intervals`). Optionally the first
segment is split into one exact run per allowed bit choice of its site, and the pass is
recorded on a tape for the linear relaxation (:mod:`~ptq_adversary.transform.linear_bounds`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from ptq_adversary import quant
from ptq_adversary.transform import shim
from ptq_adversary.transform.evaluate import prepared_weight, run_ops
from ptq_adversary.transform.intervals import Box, box_eqn, ends, roundoff
from ptq_adversary.transform.program import Lit, Program

__all__ = ["bound_segments", "quant_error"]


def quant_error(v, bits):
    """The elementwise bound ``|x_hat - x| <= delta`` of the quantizer at ``bits`` (or any
    more) for ``x`` in box ``v`` (see :func:`_quantized_box`).

    ``v``: one example's operand, a :class:`Box` or an exact array; ``bits``: int scalar.
    Returns ``delta``, shaped like ``v``'s ends.
    """
    lo, hi = ends(v)
    r = jnp.maximum(jnp.max(hi), 0.0) - jnp.minimum(jnp.min(lo), 0.0)
    u = roundoff(r)
    r = r * (1 + 2 * u)
    n = (jnp.left_shift(1, bits) - 1).astype(r.dtype)
    s = r / n * (1 + 2 * u)
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return 0.5 * s + 4 * u * (r + s) + u * mag


def _quantized_box(v, bits) -> Box:
    """Encloses ``fake_quant_activation(x, b)`` for every ``x`` in ``v`` and every ``b >= bits``.

    One example (the per-example program): with ``r`` an upper bound on ``max(hi, 0) -
    min(lo, 0)``, the step is ``s <= r / (2^bits - 1)``, and ``|x_hat - x| <= s / 2`` (rounding
    to the nearest level; the zero point is an integer and the clip at the top level moves a
    value by less than half a step, since ``z = round(-lo / s)``). The float computation of
    ``x * (1 / s)`` adds at most ``~4 u |x / s|`` steps, and of ``s * (q - z)`` one rounding.
    The sign of ``x`` is kept: ``x >= 0`` gives ``x_hat >= 0`` and ``x <= 0`` gives
    ``x_hat <= 0``, so exact zeros stay zero.
    """
    lo, hi = ends(v)
    delta = quant_error(v, bits)
    qlo = jnp.where(lo >= 0, jnp.maximum(lo - delta, 0.0), lo - delta)
    qhi = jnp.where(hi <= 0, jnp.minimum(hi + delta, 0.0), hi + delta)
    return Box(qlo, qhi)


def _quantized_hull(x, bits) -> Box:
    """The elementwise hull of ``fake_quant_activation(x, b)`` over ``bits <= b <= 16`` for an
    exact ``x`` (one example): each quantized value computed, not bounded."""
    lo = hi = x
    for b in range(quant.MIN_BITS, quant.MAX_BITS + 1):
        xq = quant.fake_quant_activation(x, jnp.asarray(b, jnp.int32))
        lo = jnp.where(b >= bits, jnp.minimum(lo, xq), lo)
        hi = jnp.where(b >= bits, jnp.maximum(hi, xq), hi)
    return Box(lo, hi)


def _box_ops(
    program: Program, ops: Sequence[int], env: dict[int, Any], bits, tape: list | None = None
) -> None:
    """``program.ops[i] for i in ops`` on exact values and boxes; ``bits`` int ``[L]`` holds
    each site's smallest bit-width (one example, the per-example program). ``tape``: see
    :func:`box_eqn`; quantizers are recorded as ``("quant" | "hull", site, x, x_hat)``."""
    read = lambda ref: ref.value if isinstance(ref, Lit) else env[ref]
    for i in ops:
        op = program.ops[i]
        vals = [read(r) for r in op.ins]
        where = shim.name_stack(op.eqn) or f"op {i} ({op.eqn.primitive.name})"
        if op.weight is None and op.site is None:
            outs = box_eqn(op.eqn, vals, where, tape)
        else:
            if op.site is not None:
                for d in op.data:
                    exact = not isinstance(vals[d], Box)
                    q = (_quantized_hull if exact else _quantized_box)(vals[d], bits[op.site])
                    if tape is not None:
                        tape.append(("hull" if exact else "quant", op.site, vals[d], q))
                    vals[d] = q
            if op.weight is not None:
                vals[op.weight] = prepared_weight(program, op, vals[op.weight])
            outs = box_eqn(op.eqn, vals, where, tape)
        for r, v in zip(op.outs, outs, strict=True):
            env[r] = v


def bound_segments(
    program: Program,
    leaves,
    live_in,
    bits,
    start: int,
    stop: int,
    tape: list | None = None,
    split: tuple[tuple[int, ...], Any] | None = None,
):
    """Segments ``start..stop`` in interval mode: exact values live at ``start`` in, the
    boxes (``(lo, hi)`` pairs; exact values as ``(v, v)``) live at ``stop`` out. With
    ``tape``, the raw values (boxes or arrays) are returned instead of pairs.

    One example of the per-example program (vmapped by the caller): ``leaves`` and
    ``live_in`` as for :func:`~ptq_adversary.transform.evaluate.evaluate_segments`; ``bits``
    int ``[L]``, each site's smallest bit-width. ``tape``: a list the pass appends its entries
    to (see :func:`_box_ops`).

    ``split``: ``(choices, allowed)`` (static bit values, bool ``[K]``): segment ``start``
    (``start >= 1``), whose input is exact, is run exactly once per allowed choice of its
    site, and the values at its end are enclosed by the hull of those runs (recorded on the
    tape as ``("split", site, values, runs, allowed)``) instead of an interval pass.
    """
    env: dict[int, Any] = dict(program.const_values)
    env.update(zip(program.param_ids, leaves, strict=True))
    names = (program.x_id,) if start == 0 else program.live[start - 1]
    env.update(zip(names, live_in, strict=True))
    last = len(program.seg_ops) - 1
    first = start
    if split is not None and start >= 1:
        choices, allowed = split
        run_ops(program, program.seg_param_ops[start], env, None, "fake")
        cut = program.live[start] if start < last else program.out_refs
        runs = []
        for b in choices:
            env_b = dict(env)
            run_ops(program, program.seg_ops[start], env_b, bits.at[start - 1].set(b), "fake")
            runs.append([r.value if isinstance(r, Lit) else env_b[r] for r in cut])
        boxes = []
        for j, r in enumerate(cut):
            if isinstance(r, Lit):
                continue
            vs = [run[j] for run in runs]
            big = jnp.asarray(jnp.inf, vs[0].dtype)
            pairs = list(zip(allowed, vs, strict=True))
            lo = functools.reduce(jnp.minimum, [jnp.where(a, v, big) for a, v in pairs])
            hi = functools.reduce(jnp.maximum, [jnp.where(a, v, -big) for a, v in pairs])
            env[r] = Box(lo, hi)
            boxes.append((env[r], vs))
        if tape is not None:
            tape.append(("split", start - 1, boxes, allowed))
        first = start + 1
    for k in range(first, stop + 1):
        run_ops(program, program.seg_param_ops[k], env, None, "fake")
        _box_ops(program, program.seg_ops[k], env, bits, tape)
    refs = program.live[stop] if stop < last else program.out_refs
    raw = tuple(r.value if isinstance(r, Lit) else env[r] for r in refs)
    return raw if tape is not None else tuple(ends(v) for v in raw)
