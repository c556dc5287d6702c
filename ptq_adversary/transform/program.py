"""The flat program: a traced jaxpr inlined into numbered ops, with its sites, cut into segments.

:class:`Builder` flattens a closed program into :class:`Op` s, inlining the call-like
equations (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``) that hold a conv/dot on
x-dependent values, and numbers the quantization sites in program order (the site rules are in
the package docstring). Values are integer ids; an operand is an id or a :class:`Lit`.
:func:`make_program` turns a flattened trace into a :class:`Program`, cut before every site's
quantizer into ``L + 1`` segments with the values live across each cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from ptq_adversary.transform import shim
from ptq_adversary.transform.errors import TransformError

__all__ = [
    "ActivationProducts",
    "Builder",
    "Lit",
    "Op",
    "Program",
    "dead_sites",
    "flops",
    "make_program",
]

#: What a conv/dot of two activations is: full precision, a site, or refused.
ActivationProducts = Literal["skip", "quantize", "error"]


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand of an :class:`Op` (``value``: a Python scalar or an array)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Op:
    """One primitive application of the inlined program.

    ``ins``: value ids or :class:`Lit`; ``outs``: value ids. ``linear`` marks a conv/dot with
    one x-dependent (``data``) and one parameter-only (``weight``) operand index; ``site`` is its
    site number when its data operand is quantized.
    """

    eqn: Any
    ins: tuple[Any, ...]
    outs: tuple[int, ...]
    xdep: bool
    data: tuple[int, ...] = ()
    weight: int | None = None
    site: int | None = None


def flops(eqn: Any, in_avals: Sequence[Any], out_aval: Any) -> int:
    """Multiply-adds x 2 of a conv/dot equation with operand avals ``in_avals`` (the whole
    operand shapes, batch included) and output aval ``out_aval``."""
    out = math.prod(out_aval.shape)
    if shim.is_conv(eqn):
        dn = eqn.params["dimension_numbers"]
        rhs = in_avals[1].shape
        kernel = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # in-features x spatial
        return 2 * out * kernel
    (lc, _), _ = eqn.params["dimension_numbers"]
    return 2 * out * math.prod(in_avals[0].shape[d] for d in lc)


class Builder:
    """Flattens a closed jaxpr into :class:`Op` s, inlining calls that contain linear ops.

    Attributes:
      ops: the flat ops, in program order.
      avals: value id -> abstract value (shape, dtype).
      xdep: value id -> whether it depends on the input ``x``.
      post_linear: value id -> whether it reaches ``x`` through a conv/dot.
      const_values: value id -> the constant of the traced program.
      num_sites: the sites numbered so far (dead ones included).
    """

    def __init__(self, activation_products: ActivationProducts, quantize_first: bool):
        self.ops: list[Op] = []
        self.avals: dict[int, Any] = {}
        self.xdep: dict[int, bool] = {}
        self.post_linear: dict[int, bool] = {}  # reaches x through a conv/dot
        self.const_values: dict[int, Any] = {}
        self.activation_products = activation_products
        self.quantize_first = quantize_first
        self.num_sites = 0
        self._next = 0

    def new(self, aval, xdep: bool, post: bool) -> int:
        """A new value id with its aval, x-dependence and post-linear flag."""
        i = self._next
        self._next += 1
        self.avals[i], self.xdep[i], self.post_linear[i] = aval, xdep, post
        return i

    def flags(self, ref) -> tuple[bool, bool]:
        """``(xdep, post_linear)`` of an operand (a literal: neither)."""
        if isinstance(ref, Lit):
            return False, False
        return self.xdep[ref], self.post_linear[ref]

    def add(self, closed, in_refs: Sequence[Any], where: str) -> list[Any]:
        """Appends a closed program's equations run on ``in_refs``; returns its output refs."""
        jaxpr, consts = shim.open_program(closed)
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            ref = self.new(shim.aval(v), False, False)
            self.const_values[ref] = c
            env[v] = ref
        for v, ref in zip(jaxpr.invars, in_refs, strict=True):
            env[v] = ref

        def read(v):
            return Lit(v.val) if shim.is_literal(v) else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            flags = [self.flags(r) for r in ins]
            xdep = any(f[0] for f in flags)
            post = any(f[1] for f in flags)
            body = shim.inline_body(eqn) if xdep else None
            if body is not None and self._has_linear(body, [f[0] for f in flags]):
                outs = self.add(body, ins, f"{where}/{eqn.primitive.name}")
                for v, r in zip(eqn.outvars, outs, strict=True):
                    env[v] = r
                continue
            if xdep and eqn.primitive.name in shim.LOOP_NAMES or (xdep and body is None):
                for sub in shim.subprograms(eqn):
                    if self._has_linear(sub, None):
                        construct = shim.LOOP_NAMES.get(eqn.primitive.name, eqn.primitive.name)
                        raise TransformError(
                            f"a conv/dot_general that reads the input runs inside {construct} "
                            f"(primitive {eqn.primitive.name!r} at "
                            f"{shim.name_stack(eqn) or where}): "
                            "its sites cannot be numbered statically. Unroll the loop in the "
                            "model (e.g. a Python for-loop instead of nn.scan / lax.scan, "
                            "jnp.where instead of lax.cond) for quantized evaluation."
                        )
            op_kwargs: dict[str, Any] = {}
            out_post = post
            if (shim.is_conv(eqn) or shim.is_dot(eqn)) and xdep:
                op_kwargs, out_post = self._linear(eqn, ins, flags)
            outs = [self.new(shim.aval(v), xdep, out_post) for v in eqn.outvars]
            self.ops.append(Op(eqn, tuple(ins), tuple(outs), xdep, **op_kwargs))
            for v, r in zip(eqn.outvars, outs, strict=True):
                env[v] = r
        return [read(v) for v in jaxpr.outvars]

    def _linear(self, eqn, ins, flags) -> tuple[dict[str, Any], bool]:
        xdeps = [f[0] for f in flags[:2]]
        if all(xdeps):
            if self.activation_products == "error":
                raise TransformError(
                    f"{eqn.primitive.name} at {shim.name_stack(eqn) or 'top level'} multiplies "
                    "two activations (e.g. attention's Q K^T); pass activation_products='skip' "
                    "or 'quantize'"
                )
            if self.activation_products == "skip":
                return {}, True
            site, self.num_sites = self.num_sites, self.num_sites + 1
            return {"data": (0, 1), "site": site}, True
        d = 0 if xdeps[0] else 1
        if shim.is_conv(eqn) and d != 0:
            raise TransformError(
                "conv_general_dilated with the activation as its kernel operand is unsupported "
                f"(at {shim.name_stack(eqn) or 'top level'})"
            )
        kwargs: dict[str, Any] = {"data": (d,), "weight": 1 - d}
        if flags[d][1] or self.quantize_first:
            kwargs["site"], self.num_sites = self.num_sites, self.num_sites + 1
        return kwargs, True

    def _has_linear(self, closed, xdep_in: Sequence[bool] | None) -> bool:
        """Whether a nested program holds a conv/dot on x-dependent values (None: any input)."""
        jaxpr, _ = shim.open_program(closed)
        flags = [True] * len(jaxpr.invars) if xdep_in is None else list(xdep_in)
        dep = dict(zip(jaxpr.invars, flags, strict=True))
        for eqn in jaxpr.eqns:
            ins = [False if shim.is_literal(v) else dep.get(v, False) for v in eqn.invars]
            if (shim.is_conv(eqn) or shim.is_dot(eqn)) and any(ins[:2]):
                return True
            if any(ins) and any(self._has_linear(s, None) for s in shim.subprograms(eqn)):
                return True
            for v in eqn.outvars:
                dep[v] = any(ins)
        return False


def dead_sites(ops: Sequence[Op], out_refs, num_sites: int) -> set[int]:
    """The site numbers (of ``0..num_sites-1``) whose op the outputs ``out_refs`` do not need."""
    needed = {r for r in out_refs if not isinstance(r, Lit)}
    live_sites = set()
    for op in reversed(ops):
        if any(r in needed for r in op.outs):
            needed.update(r for r in op.ins if not isinstance(r, Lit))
            if op.site is not None:
                live_sites.add(op.site)
    return set(range(num_sites)) - live_sites


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """An inlined program and everything derived from it (static).

    The reference program is traced for one example (``x[:1]``); batched programs (traced at
    a call's batch size) carry ``batch_axes``.
    """

    ops: tuple[Op, ...]
    param_ids: tuple[int, ...]
    x_id: int
    out_refs: tuple[Any, ...]
    const_values: dict[int, Any]
    xdep: dict[int, bool]
    site_ops: tuple[int, ...]  # op index of each site
    weight_bits: int | None
    # segment k: the x-dependent ops it runs, the param-only ops they need, and the values
    # live at its end (carried into segment k + 1)
    seg_ops: tuple[tuple[int, ...], ...] = ()
    seg_param_ops: tuple[tuple[int, ...], ...] = ()
    live: tuple[tuple[int, ...], ...] = ()
    avals: dict[int, Any] = dataclasses.field(default_factory=dict)
    # batched programs only: op index -> (batch axis of each data operand, output batch axis)
    batch_axes: dict[int, tuple[tuple[int, ...], int]] | None = None


def _analyse(program: Program) -> Program:
    """Cuts the program before every site: per-segment ops and the values live at each cut."""
    ops = program.ops
    producer = {r: i for i, op in enumerate(ops) for r in op.outs}
    cuts = [0, *program.site_ops, len(ops)]
    seg_ops, seg_param_ops, live = [], [], []
    out_ids = [r for r in program.out_refs if not isinstance(r, Lit)]
    for k in range(len(cuts) - 1):
        lo, hi = cuts[k], cuts[k + 1]
        mine = tuple(i for i in range(lo, hi) if ops[i].xdep)
        seg_ops.append(mine)
        # parameter-only producers these ops need (recomputed per segment: they are shared by
        # every prefix, and XLA folds them into the weights' preparation)
        need, stack = set(), [r for i in mine for r in ops[i].ins if not isinstance(r, Lit)]
        while stack:
            r = stack.pop()
            if program.xdep.get(r) or r not in producer or producer[r] in need:
                continue
            need.add(producer[r])
            stack.extend(x for x in ops[producer[r]].ins if not isinstance(x, Lit))
        seg_param_ops.append(tuple(sorted(need)))
        if hi < len(ops):  # values defined before the cut hi and used at or after it
            used_later = {r for op in ops[hi:] for r in op.ins if not isinstance(r, Lit)}
            used_later |= set(out_ids)
            defined = {program.x_id} | {r for op in ops[:hi] if op.xdep for r in op.outs}
            live.append(tuple(sorted(defined & used_later)))
        else:
            live.append(tuple(out_ids))
    return dataclasses.replace(
        program, seg_ops=tuple(seg_ops), seg_param_ops=tuple(seg_param_ops), live=tuple(live)
    )


def make_program(
    builder: Builder,
    ops: Sequence[Op],
    param_ids: Sequence[int],
    x_id: int,
    out_refs: Sequence[Any],
    site_ops: Sequence[int],
    weight_bits: int | None,
    batch_axes: dict[int, tuple[tuple[int, ...], int]] | None = None,
) -> Program:
    """The :class:`Program` of a flattened trace, cut at its sites (one segment per cut).

    ``ops``: the builder's ops with the sites renumbered; ``site_ops``: the op index of each
    site, in site order; ``batch_axes``: see :class:`Program` (batched programs only).
    """
    return _analyse(
        Program(
            ops=tuple(ops),
            param_ids=tuple(param_ids),
            x_id=x_id,
            out_refs=tuple(out_refs),
            const_values=dict(builder.const_values),
            xdep=dict(builder.xdep),
            avals=dict(builder.avals),
            site_ops=tuple(site_ops),
            weight_bits=weight_bits,
            batch_axes=batch_axes,
        )
    )
