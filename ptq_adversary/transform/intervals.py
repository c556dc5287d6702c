"""Interval rules: sound elementwise enclosures of a program's values, one primitive at a time.

A value is either exact (an array) or a :class:`Box` ``[lo, hi]``, elementwise. Rules are
interval arithmetic (IBP), computed in the value's float dtype and then widened by a bound on
the rounding error of the operation, so that the enclosure also holds for what the float
program computes. Covered: conv, dot_general, elementwise arithmetic, monotone activations
(relu, tanh, sigmoid, ...), comparisons and ``select_n`` (boolean boxes), BatchNorm in
inference mode, add/concatenate, pooling and reshapes; call bodies are recursed into. Anything
else raises :class:`~ptq_adversary.transform.UnsupportedPrimitiveError` naming the primitive.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp

from ptq_adversary.transform import shim
from ptq_adversary.transform.errors import UnsupportedPrimitiveError
from ptq_adversary.transform.program import flops

__all__ = ["Box", "box_eqn", "ends", "roundoff"]


def roundoff(x) -> float:
    """Twice the unit roundoff of ``x``'s float dtype (float32: ``2^-23``; ``2^-23`` for a
    non-float ``x`` too): one rounding, with margin."""
    dtype = jnp.result_type(x)
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 2.0**-23


class Box(tuple):
    """``(lo, hi)``: an elementwise enclosure of an x-dependent value (``lo <= hi``)."""

    __slots__ = ()

    def __new__(cls, lo, hi):
        return super().__new__(cls, (lo, hi))

    lo = property(lambda self: self[0])
    hi = property(lambda self: self[1])


def ends(v) -> tuple[Any, Any]:
    """``(lo, hi)`` of a box, ``(v, v)`` of an exact value."""
    return (v.lo, v.hi) if isinstance(v, Box) else (v, v)


def _widen(lo, hi, err) -> Box:
    """``[lo - err, hi + err]`` (``err``: a bound on the rounding error, broadcastable)."""
    return Box(lo - err, hi + err)


def _ulps(lo, hi, k: float = 1.0) -> Box:
    """Widens by ``k`` roundings relative to the magnitude (one elementwise float op)."""
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _widen(lo, hi, k * roundoff(lo) * mag + jnp.finfo(jnp.result_type(lo)).tiny)


# Monotone non-decreasing in every operand and exact in float: apply to both ends.
_MONOTONE_EXACT = {
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
    "concatenate", "pad", "rev", "copy", "copy_p", "convert_element_type", "reduce_max",
    "reduce_min", "reduce_window_max", "reduce_window_min", "max", "min", "dynamic_slice",
    "gather", "cummax", "cummin", "clamp", "reduce_precision", "floor", "ceil", "round",
    "sign", "dynamic_update_slice",
}  # fmt: skip
# ... of those, the ones whose operands from this position on are indices (must be exact)
_INDEXED = {"dynamic_slice": 1, "gather": 1, "dynamic_update_slice": 2}
# Monotone non-decreasing unary functions XLA evaluates to a few ulps.
_MONOTONE_ROUNDED = {
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "cbrt", "erf",
    "atan", "asinh", "sinh",
}  # fmt: skip
# Sums: monotone, with a rounding error of at most (terms + 1) roundings of the magnitude.
_SUMS = {"reduce_sum", "reduce_window_sum", "cumsum", "add", "add_any"}
_COMPARE = {"gt", "ge", "lt", "le"}


def _sum_terms(eqn, vals) -> int:
    name = eqn.primitive.name
    if name == "reduce_sum":
        shape = shim.aval(eqn.invars[0]).shape
        return math.prod(shape[a] for a in eqn.params["axes"]) or 1
    if name == "reduce_window_sum":
        return math.prod(eqn.params["window_dimensions"])
    if name == "cumsum":
        return shim.aval(eqn.invars[0]).shape[eqn.params["axis"]]
    return 2


def _box_linear(eqn, vals) -> Box:
    """A conv/dot of boxes or exact arrays: centre/radius form, ``|A| r`` radii."""
    (al, ah), (bl, bh) = ends(vals[0]), ends(vals[1])
    ac, ar = (al + ah) / 2, (ah - al) / 2
    bc, br = (bl + bh) / 2, (bh - bl) / 2
    bind = lambda a, b: shim.bind(eqn, [a, b, *vals[2:]])[0]
    centre = bind(ac, bc)
    radius = jnp.zeros_like(centre)
    if isinstance(vals[1], Box):
        radius = radius + bind(jnp.abs(ac), br)
    if isinstance(vals[0], Box):
        radius = radius + bind(ar, jnp.abs(bc))
    if isinstance(vals[0], Box) and isinstance(vals[1], Box):
        radius = radius + bind(ar, br)
    # float error of the sums: at most (K + 1) roundings of sum |a||b| (K: terms per output)
    mag = bind(jnp.abs(ac) + ar, jnp.abs(bc) + br)
    out = shim.aval(eqn.outvars[0])
    terms = flops(eqn, [shim.aval(v) for v in eqn.invars], out) // max(2 * math.prod(out.shape), 1)
    u = roundoff(centre)
    return _widen(centre, centre, radius * (1 + 2 * u) + (terms + 2) * u * mag)


def box_eqn(eqn, vals: list, where: str, tape: list | None = None) -> list:
    """One equation on exact values and boxes (nested programs recursed into).

    ``tape``: if given, every equation with a box operand is appended as ``("eqn", eqn,
    vals, outs)`` (call bodies as their equations), for the linear relaxation's backward pass.
    """
    if not any(isinstance(v, Box) for v in vals):
        return shim.bind(eqn, vals)
    name = eqn.primitive.name
    body = shim.inline_body(eqn)
    if body is not None:
        return _box_program(body, vals, f"{where}/{name}", tape)
    outs = [_no_nan(o) for o in _box_rule(eqn, vals, where)]
    if tape is not None:
        tape.append(("eqn", eqn, vals, outs))
    return outs


def _no_nan(v):
    """A float box whose ends are NaN (``inf - inf`` after an overflow) becomes unbounded."""
    if not isinstance(v, Box) or not jnp.issubdtype(jnp.result_type(v.lo), jnp.floating):
        return v
    return Box(
        jnp.where(jnp.isnan(v.lo), -jnp.inf, v.lo), jnp.where(jnp.isnan(v.hi), jnp.inf, v.hi)
    )


def _box_rule(eqn, vals: list, where: str) -> list:
    """The interval rule of one primitive (at least one operand is a box)."""
    name = eqn.primitive.name
    if name in _MONOTONE_EXACT:
        if name in _INDEXED and any(isinstance(v, Box) for v in vals[_INDEXED[name] :]):
            raise UnsupportedPrimitiveError(
                f"unsupported primitive {name} with input-dependent indices at {where}"
            )
        los = [v.lo if isinstance(v, Box) else v for v in vals]
        his = [v.hi if isinstance(v, Box) else v for v in vals]
        return [
            Box(lo, hi) for lo, hi in zip(shim.bind(eqn, los), shim.bind(eqn, his), strict=True)
        ]
    if name in _MONOTONE_ROUNDED:
        lo, hi = ends(vals[0])
        return [_ulps(shim.bind(eqn, [lo])[0], shim.bind(eqn, [hi])[0], 4.0)]
    if name in _SUMS:
        los = [ends(v)[0] for v in vals]
        his = [ends(v)[1] for v in vals]
        lo, hi = shim.bind(eqn, los)[0], shim.bind(eqn, his)[0]
        mags = [jnp.maximum(jnp.abs(a), jnp.abs(b)) for a, b in zip(los, his, strict=True)]
        mag = shim.bind(eqn, mags)[0]
        return [_widen(lo, hi, (_sum_terms(eqn, vals) + 1) * roundoff(lo) * mag)]
    if name == "neg":
        lo, hi = ends(vals[0])
        return [Box(-hi, -lo)]
    if name == "sub":
        (al, ah), (bl, bh) = ends(vals[0]), ends(vals[1])
        return [_ulps(al - bh, ah - bl)]
    if name in ("mul", "div"):
        (al, ah), (bl, bh) = ends(vals[0]), ends(vals[1])
        if name == "div":
            if isinstance(vals[1], Box):
                straddles = (bl <= 0) & (bh >= 0)
                bl, bh = 1 / bh, 1 / bl  # 1/b is decreasing where b keeps its sign
                bl, bh = jnp.where(straddles, -jnp.inf, bl), jnp.where(straddles, jnp.inf, bh)
            else:
                bl = bh = 1 / bl
        prods = [al * bl, al * bh, ah * bl, ah * bh]
        lo, hi = functools.reduce(jnp.minimum, prods), functools.reduce(jnp.maximum, prods)
        out = _ulps(lo, hi, 3.0 if name == "div" else 1.0)
        if name == "div" and isinstance(vals[1], Box):  # 1 / b unbounded where b may be 0
            out = Box(jnp.where(straddles, -jnp.inf, out.lo), jnp.where(straddles, jnp.inf, out.hi))
        return [out]
    if name in ("integer_pow", "square"):
        k = eqn.params.get("y", 2)
        lo, hi = ends(vals[0])
        if k < 0:  # x^k for k < 0: monotone on each side of 0, unbounded where 0 is inside
            straddles = (lo <= 0) & (hi >= 0)
            a, b = lo**k, hi**k
            out = _ulps(jnp.minimum(a, b), jnp.maximum(a, b), float(abs(k)) + 2.0)
            return [Box(jnp.where(straddles, -jnp.inf, out.lo),
                         jnp.where(straddles, jnp.inf, out.hi))]  # fmt: skip
        a, b = lo**k, hi**k
        if k % 2 == 0:
            straddles = (lo < 0) & (hi > 0)
            lo2 = jnp.where(straddles, 0.0, jnp.minimum(a, b))
            return [_ulps(lo2, jnp.maximum(a, b), float(abs(k)))]
        return [_ulps(jnp.minimum(a, b), jnp.maximum(a, b), float(abs(k)))]
    if name == "abs":
        lo, hi = ends(vals[0])
        straddles = (lo < 0) & (hi > 0)
        small = jnp.where(straddles, 0.0, jnp.minimum(jnp.abs(lo), jnp.abs(hi)))
        return [Box(small, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))]
    if name == "rsqrt":
        lo, hi = ends(vals[0])
        return [_ulps(shim.bind(eqn, [hi])[0], shim.bind(eqn, [lo])[0], 4.0)]
    if name in _COMPARE:
        (al, ah), (bl, bh) = ends(vals[0]), ends(vals[1])
        if name in ("gt", "ge"):
            al, ah, bl, bh = bl, bh, al, ah  # a > b  <=>  b < a
        strict = name in ("gt", "lt")
        surely = (ah < bl) if strict else (ah <= bl)
        maybe = (al < bh) if strict else (al <= bh)
        return [Box(surely, maybe)]  # boolean box: (surely true, possibly true)
    if name == "select_n":
        pred, cases = vals[0], vals[1:]
        case_ends = [ends(c) for c in cases]
        if not isinstance(pred, Box):
            lo = shim.bind(eqn, [pred, *[e[0] for e in case_ends]])[0]
            hi = shim.bind(eqn, [pred, *[e[1] for e in case_ends]])[0]
            return [Box(lo, hi)]
        if len(cases) != 2:
            raise UnsupportedPrimitiveError(f"unsupported primitive {name} (n-ary) at {where}")
        surely, maybe = pred
        union_lo = jnp.minimum(case_ends[0][0], case_ends[1][0])
        union_hi = jnp.maximum(case_ends[0][1], case_ends[1][1])
        lo = jnp.where(surely, case_ends[1][0], jnp.where(maybe, union_lo, case_ends[0][0]))
        hi = jnp.where(surely, case_ends[1][1], jnp.where(maybe, union_hi, case_ends[0][1]))
        return [Box(lo, hi)]
    if shim.is_conv(eqn) or shim.is_dot(eqn):
        return [_box_linear(eqn, vals)]
    raise UnsupportedPrimitiveError(
        f"unsupported primitive {name} at {where}: interval bounds cover conv, dot_general, "
        "elementwise arithmetic, monotone activations (relu, tanh, sigmoid, ...), BatchNorm in "
        "inference mode, add/concatenate, pooling and reshapes"
    )


def _box_program(closed, vals: list, where: str, tape: list | None = None) -> list:
    """A nested program (a call body) on exact values and boxes."""
    jaxpr, consts = shim.open_program(closed)
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, vals, strict=True))
    read = lambda v: v.val if shim.is_literal(v) else env[v]
    for eqn in jaxpr.eqns:
        outs = box_eqn(eqn, [read(v) for v in eqn.invars], where, tape)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]
