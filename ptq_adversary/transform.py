"""Dynamic PTQ as a program transformation: ``quantize(fn, params, x)`` -> ``qfn(params, x, bits)``.

:func:`quantize` traces any JAX function ``fn(params, x) -> logits`` (a linen ``module.apply``
with its variables, a function over an NNX module's state, plain ``jax.numpy`` code) into its
program and finds the **quantization sites** there, so no model has to be written for this
project. The result, a :class:`QuantizedFn`, evaluates the same program with

* the data operand of every site fake-quantized per example at ``bits[:, l]`` (dynamic,
  asymmetric, :func:`~ptq_adversary.quant.fake_quant_activation`), and
* the parameter operand of every conv/dot (site or not) fake-quantized per output channel at
  the static ``weight_bits`` (:func:`~ptq_adversary.quant.fake_quant_weight`).

Site rules (docs/DESIGN.md has the full account):

* A site is a ``conv_general_dilated`` or ``dot_general`` with one operand that depends on
  ``x`` and one that depends only on ``params`` or constants. Sites are numbered in program
  order. The layer that reads the raw input (its data operand reaches ``x`` through no other
  conv/dot) is not a site unless ``quantize_first=True``: its input is the image.
* A product of two activations (attention's ``Q K^T`` and ``P V``) is not a site by default
  (``activation_products="skip"``: it runs in full precision); ``"quantize"`` makes it one site
  whose two operands are both quantized at that site's bits; ``"error"`` refuses the model.
* Sites inside ``jit``, ``remat``/``checkpoint``, ``custom_jvp`` and ``custom_vjp`` bodies are
  found: those bodies are inlined (a custom derivative rule around a site is then replaced by
  differentiation of the body, straight-through at the site). A site inside ``scan``,
  ``while_loop`` or ``cond`` is refused with an error naming the construct.

Semantics are per example whatever the model's code does: the program is traced for one example
(``x[:1]``) and the transformed function is ``jax.vmap``-ed over the batch, so ranges, and
everything else, never mix examples. :func:`quantize` checks that the traced program computes
the same thing as ``fn`` on a batch (it refuses models that mix examples, e.g. BatchNorm with
batch statistics: quantized mode runs BatchNorm on its running statistics).

Prefix sharing: cutting the program before each site's quantizer gives ``L + 1`` segments
(:meth:`QuantizedFn.run_segments`); the values live across a cut are carried, so residual
models cut as well as chains. The activations after segment ``k`` depend only on
``bits[:, :k]``, which ``ptq_adversary.audit.exhaustive`` uses to share work between
allocations with a common prefix.

JAX internals: every use of JAX's program representation (jaxpr types, primitive binding) is in
the "JAX program shim" section of this module. Tested on jax 0.10.2; written for the names of
jax 0.6-0.11 (``jit_p`` / ``pjit``, ``get_bind_params`` returning the params alone or with
subfuns, ``ClosedJaxpr`` with or without a separate ``Jaxpr``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ptq_adversary import quant

__all__ = [
    "QuantizedFn",
    "Site",
    "TransformError",
    "UnsupportedPrimitiveError",
    "quantize",
]

ActivationProducts = Literal["skip", "quantize", "error"]


class TransformError(ValueError):
    """The program cannot be quantized as asked (no site, a site in a loop, mixed examples...)."""


# ================================================================== JAX program shim
# The only place that touches jaxpr types and primitive binding. Names that moved between
# releases are looked up defensively here and nowhere else.


def _primitive(name: str):
    return getattr(jex.core.primitives, name, None)


_CONV = _primitive("conv_general_dilated_p")
_DOT = _primitive("dot_general_p")
# Call-like primitives whose body is one jaxpr taking the equation's operands in order.
_INLINE_NAMES = {"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}
_CUSTOM_NAMES = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_LOOP_NAMES = {"scan": "lax.scan", "while": "lax.while_loop", "cond": "lax.cond/switch"}


def _trace(fn: Callable, *args) -> Any:
    """``jax.make_jaxpr(fn)(*args)``: a closed program (arrays or ShapeDtypeStructs in)."""
    return jax.make_jaxpr(fn)(*args)


def _open(closed: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a ClosedJaxpr (jax <= 0.10) or of a merged Jaxpr (later)."""
    if hasattr(closed, "jaxpr") and hasattr(closed, "consts"):
        return closed.jaxpr, closed.consts
    return closed, tuple(getattr(closed, "consts", ()))


def _is_literal(v: Any) -> bool:
    return isinstance(v, jex.core.Literal)


def _aval(v: Any) -> Any:
    return v.aval


def _bind(eqn: Any, invals: Sequence[Any], **overrides) -> list[Any]:
    """Re-binds one equation's primitive on new operands (optionally with changed params)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(params, tuple) and len(params) == 2 and isinstance(params[1], dict):
        subfuns, params = params  # jax < 0.10: (subfuns, params)
    params = {**params, **overrides}
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is not None:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _subprograms(eqn: Any) -> list[Any]:
    """Every jaxpr nested in an equation's params (bodies of loops, branches, calls)."""
    found = []

    def visit(p):
        if hasattr(p, "eqns") or (hasattr(p, "jaxpr") and hasattr(p, "consts")):
            found.append(p)
        elif isinstance(p, (tuple, list)):
            for q in p:
                visit(q)

    for p in eqn.params.values():
        visit(p)
    return found


def _inline_body(eqn: Any) -> Any | None:
    """The body to inline for a call-like equation (its operands map to the body's inputs)."""
    name = eqn.primitive.name
    if name in _INLINE_NAMES:
        return eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if name in _CUSTOM_NAMES:
        return eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    return None


def _name_stack(eqn: Any) -> str:
    info = getattr(eqn, "source_info", None)
    return str(getattr(info, "name_stack", "") or "")


def _is_conv(eqn: Any) -> bool:
    return eqn.primitive is _CONV or eqn.primitive.name == "conv_general_dilated"


def _is_dot(eqn: Any) -> bool:
    return eqn.primitive is _DOT or eqn.primitive.name == "dot_general"


# ================================================================== the flat program
@dataclasses.dataclass(frozen=True)
class _Lit:
    value: Any


@dataclasses.dataclass(frozen=True)
class _Op:
    """One primitive application of the inlined program.

    ``ins``: value ids or :class:`_Lit`; ``outs``: value ids. ``linear`` marks a conv/dot with
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


@dataclasses.dataclass(frozen=True)
class Site:
    """A quantization site found in the program.

    Attributes:
      index: position in ``bits[:, l]`` (program order).
      name: the Flax module path of its weight (``conv2``, ``layer1/0/conv1``) where the
        program records one, else a generated name (``dot_general_3``).
      op: ``"conv"``, ``"dense"`` (a ``dot_general``) or ``"matmul"`` (activation product).
      data_shape: per-example shape of the quantized data operand (batch axis of size 1).
      weight_shape: shape of the parameter operand (``None`` for an activation product).
      out_shape: per-example output shape.
      flops: multiply-adds x 2 per example.
      flops_share: ``flops`` over the sum of all convs' and dots' flops (sites or not).
    """

    index: int
    name: str
    op: str
    data_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...]
    flops: int
    flops_share: float


def _flops(eqn: Any, in_avals: Sequence[Any], out_aval: Any) -> int:
    out = math.prod(out_aval.shape)
    if _is_conv(eqn):
        dn = eqn.params["dimension_numbers"]
        rhs = in_avals[1].shape
        kernel = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # in-features x spatial
        return 2 * out * kernel
    (lc, _), _ = eqn.params["dimension_numbers"]
    return 2 * out * math.prod(in_avals[0].shape[d] for d in lc)


class _Builder:
    """Flattens a closed jaxpr into :class:`_Op` s, inlining calls that contain linear ops."""

    def __init__(self, activation_products: ActivationProducts, quantize_first: bool):
        self.ops: list[_Op] = []
        self.avals: dict[int, Any] = {}
        self.xdep: dict[int, bool] = {}
        self.post_linear: dict[int, bool] = {}  # reaches x through a conv/dot
        self.const_values: dict[int, Any] = {}
        self.activation_products = activation_products
        self.quantize_first = quantize_first
        self.num_sites = 0
        self._next = 0

    def new(self, aval, xdep: bool, post: bool) -> int:
        i = self._next
        self._next += 1
        self.avals[i], self.xdep[i], self.post_linear[i] = aval, xdep, post
        return i

    def flags(self, ref) -> tuple[bool, bool]:
        if isinstance(ref, _Lit):
            return False, False
        return self.xdep[ref], self.post_linear[ref]

    def add(self, closed, in_refs: Sequence[Any], where: str) -> list[Any]:
        jaxpr, consts = _open(closed)
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            ref = self.new(_aval(v), False, False)
            self.const_values[ref] = c
            env[v] = ref
        for v, ref in zip(jaxpr.invars, in_refs, strict=True):
            env[v] = ref

        def read(v):
            return _Lit(v.val) if _is_literal(v) else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            flags = [self.flags(r) for r in ins]
            xdep = any(f[0] for f in flags)
            post = any(f[1] for f in flags)
            body = _inline_body(eqn) if xdep else None
            if body is not None and self._has_linear(body, [f[0] for f in flags]):
                outs = self.add(body, ins, f"{where}/{eqn.primitive.name}")
                for v, r in zip(eqn.outvars, outs, strict=True):
                    env[v] = r
                continue
            if xdep and eqn.primitive.name in _LOOP_NAMES or (xdep and body is None):
                for sub in _subprograms(eqn):
                    if self._has_linear(sub, None):
                        construct = _LOOP_NAMES.get(eqn.primitive.name, eqn.primitive.name)
                        raise TransformError(
                            f"a conv/dot_general that reads the input runs inside {construct} "
                            f"(primitive {eqn.primitive.name!r} at {_name_stack(eqn) or where}): "
                            "its sites cannot be numbered statically. Unroll the loop in the "
                            "model (e.g. a Python for-loop instead of nn.scan / lax.scan, "
                            "jnp.where instead of lax.cond) for quantized evaluation."
                        )
            op_kwargs: dict[str, Any] = {}
            out_post = post
            if (_is_conv(eqn) or _is_dot(eqn)) and xdep:
                op_kwargs, out_post = self._linear(eqn, ins, flags)
            outs = [self.new(_aval(v), xdep, out_post) for v in eqn.outvars]
            self.ops.append(_Op(eqn, tuple(ins), tuple(outs), xdep, **op_kwargs))
            for v, r in zip(eqn.outvars, outs, strict=True):
                env[v] = r
        return [read(v) for v in jaxpr.outvars]

    def _linear(self, eqn, ins, flags) -> tuple[dict[str, Any], bool]:
        xdeps = [f[0] for f in flags[:2]]
        if all(xdeps):
            if self.activation_products == "error":
                raise TransformError(
                    f"{eqn.primitive.name} at {_name_stack(eqn) or 'top level'} multiplies two "
                    "activations (e.g. attention's Q K^T); pass activation_products='skip' or "
                    "'quantize'"
                )
            if self.activation_products == "skip":
                return {}, True
            site, self.num_sites = self.num_sites, self.num_sites + 1
            return {"data": (0, 1), "site": site}, True
        d = 0 if xdeps[0] else 1
        if _is_conv(eqn) and d != 0:
            raise TransformError(
                "conv_general_dilated with the activation as its kernel operand is unsupported "
                f"(at {_name_stack(eqn) or 'top level'})"
            )
        kwargs: dict[str, Any] = {"data": (d,), "weight": 1 - d}
        if flags[d][1] or self.quantize_first:
            kwargs["site"], self.num_sites = self.num_sites, self.num_sites + 1
        return kwargs, True

    def _has_linear(self, closed, xdep_in: Sequence[bool] | None) -> bool:
        """Whether a nested program holds a conv/dot on x-dependent values (None: any input)."""
        jaxpr, _ = _open(closed)
        flags = [True] * len(jaxpr.invars) if xdep_in is None else list(xdep_in)
        dep = dict(zip(jaxpr.invars, flags, strict=True))
        for eqn in jaxpr.eqns:
            ins = [False if _is_literal(v) else dep.get(v, False) for v in eqn.invars]
            if (_is_conv(eqn) or _is_dot(eqn)) and any(ins[:2]):
                return True
            if any(ins) and any(self._has_linear(s, None) for s in _subprograms(eqn)):
                return True
            for v in eqn.outvars:
                dep[v] = any(ins)
        return False


# ================================================================== evaluation
def _weight_channel_axes(eqn: Any, weight: int, ndim: int) -> tuple[int, ...]:
    """Axes of the weight operand that index output channels (the rest are reduced)."""
    if _is_conv(eqn):
        return (eqn.params["dimension_numbers"].rhs_spec[0],)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contracting = set(lc if weight == 0 else rc)
    return tuple(a for a in range(ndim) if a not in contracting)


def _weight_scale_in_output(eqn: Any, weight: int, scale: jax.Array, out_ndim: int) -> jax.Array:
    """A per-channel weight scale (keepdims, weight layout) laid out to broadcast on the output."""
    if _is_conv(eqn):
        dn = eqn.params["dimension_numbers"]
        shape = [1] * out_ndim
        shape[dn.out_spec[1]] = scale.size
        return scale.reshape(shape)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if weight == 0 else (rc, rb)
    ndim = scale.ndim
    free = [a for a in range(ndim) if a not in contract and a not in batch]
    s = jnp.transpose(scale, (*batch, *free, *contract))
    s = s.reshape(s.shape[: len(batch) + len(free)])
    other_free = out_ndim - len(batch) - len(free)
    if weight == 1:  # output: batch, lhs free, rhs free
        return s.reshape(s.shape[: len(batch)] + (1,) * other_free + s.shape[len(batch) :])
    return s.reshape(s.shape + (1,) * other_free)


def _run_ops(program: _Program, ops: Sequence[int], env: dict[int, Any], bits, mode: str):
    """Evaluates ``program.ops[i] for i in ops`` on ``env``.

    ``bits``: ``None`` (no quantization), int ``[L]`` for the per-example program (one
    example, vmapped by the caller) or int ``[B, L]`` for a batched program (one whose
    ``batch_axes`` locate every site's batch axis).
    """

    def read(ref):
        return ref.value if isinstance(ref, _Lit) else env[ref]

    for i in ops:
        op = program.ops[i]
        invals = [read(r) for r in op.ins]
        if bits is None or (op.weight is None and op.site is None):
            outs = _bind(op.eqn, invals)
        else:
            outs = _linear_op(program, i, invals, bits, mode)
        for r, v in zip(op.outs, outs, strict=True):
            env[r] = v
    return env


def _per_example(x: jax.Array, axis: int | None) -> jax.Array:
    """``x`` with its examples (``axis``) first, or as one example (``None``): ``[1, size]``."""
    if axis is None:  # (reshaping costs fusion in the backward pass: only when needed)
        return x if x.ndim and x.shape[0] == 1 else x.reshape(1, -1)
    return jnp.moveaxis(x, axis, 0)  # the quantizer reduces over every axis but the first


def _from_per_example(rows: jax.Array, like: jax.Array, axis: int | None) -> jax.Array:
    if axis is None:
        return rows.reshape(like.shape)
    return jnp.moveaxis(rows, 0, axis)


def _linear_op(program: _Program, index: int, invals: list, bits, mode: str) -> list:
    """A conv/dot with its data operand(s) and weight quantized as configured.

    The activation range is per example: in the per-example program the whole operand is one
    example; in a batched one, each slice along the site's batch axis is.
    """
    op = program.ops[index]
    batched = program.batch_axes is not None
    in_axes, out_axis = program.batch_axes[index] if batched and op.site is not None else ((), None)
    if op.site is None:
        site_bits = None
    else:
        site_bits = bits[:, op.site] if batched else bits[op.site][None]
    wb = program.weight_bits
    invals = list(invals)
    if mode == "integer" and op.site is not None and wb is not None:
        out_scale = jnp.ones((site_bits.shape[0],), jnp.float32)
        for k, d in enumerate(op.data):
            axis = in_axes[k] if batched else None
            q, s, z = quant.quantize_activation(_per_example(invals[d], axis), site_bits)
            z = z.reshape((-1,) + (1,) * (q.ndim - 1))
            invals[d] = _from_per_example((q - z).astype(jnp.int32), invals[d], axis)
            out_scale = out_scale * s
        w_scale = None
        if op.weight is not None:
            w = invals[op.weight]
            axes = _weight_channel_axes(op.eqn, op.weight, w.ndim)
            qw, w_scale = quant.quantize_weight(w, wb, channel_axis=axes)
            invals[op.weight] = qw.astype(jnp.int32)
        (acc,) = _bind(op.eqn, invals, preferred_element_type=np.dtype(np.int32))
        out = acc.astype(jnp.float32)
        if batched:
            shape = [1] * out.ndim
            shape[out_axis] = out_scale.shape[0]
            out = out * out_scale.reshape(shape)
        else:
            out = out * out_scale[0]
        if w_scale is not None:
            out = out * _weight_scale_in_output(op.eqn, op.weight, w_scale, out.ndim)
        return [out.astype(_aval(op.eqn.outvars[0]).dtype)]
    if op.site is not None:
        for k, d in enumerate(op.data):
            axis = in_axes[k] if batched else None
            rows = quant.fake_quant_activation(_per_example(invals[d], axis), site_bits)
            invals[d] = _from_per_example(rows, invals[d], axis)
    if op.weight is not None:
        invals[op.weight] = _prepared_weight(program, op, invals[op.weight])
    return _bind(op.eqn, invals)


def _prepared_weight(program: _Program, op: _Op, w: jax.Array) -> jax.Array:
    """A conv/dot's parameter operand as the quantized program uses it (fake-quantized)."""
    if program.weight_bits is None:
        return w
    axes = _weight_channel_axes(op.eqn, op.weight, w.ndim)
    return quant.fake_quant_weight(w, program.weight_bits, channel_axis=axes)


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
    """An inlined program and everything derived from it (static).

    The reference program is traced for one example (``x[:1]``); batched programs (traced at
    a call's batch size) carry ``batch_axes``.
    """

    ops: tuple[_Op, ...]
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


def _analyse(program: _Program) -> _Program:
    """Cuts the program before every site: per-segment ops and the values live at each cut."""
    ops = program.ops
    producer = {r: i for i, op in enumerate(ops) for r in op.outs}
    cuts = [0, *program.site_ops, len(ops)]
    seg_ops, seg_param_ops, live = [], [], []
    out_ids = [r for r in program.out_refs if not isinstance(r, _Lit)]
    for k in range(len(cuts) - 1):
        lo, hi = cuts[k], cuts[k + 1]
        mine = tuple(i for i in range(lo, hi) if ops[i].xdep)
        seg_ops.append(mine)
        # parameter-only producers these ops need (recomputed per segment: they are shared by
        # every prefix, and XLA folds them into the weights' preparation)
        need, stack = set(), [r for i in mine for r in ops[i].ins if not isinstance(r, _Lit)]
        while stack:
            r = stack.pop()
            if program.xdep.get(r) or r not in producer or producer[r] in need:
                continue
            need.add(producer[r])
            stack.extend(x for x in ops[producer[r]].ins if not isinstance(x, _Lit))
        seg_param_ops.append(tuple(sorted(need)))
        if hi < len(ops):  # values defined before the cut hi and used at or after it
            used_later = {r for op in ops[hi:] for r in op.ins if not isinstance(r, _Lit)}
            used_later |= set(out_ids)
            defined = {program.x_id} | {r for op in ops[:hi] if op.xdep for r in op.outs}
            live.append(tuple(sorted(defined & used_later)))
        else:
            live.append(tuple(out_ids))
    return dataclasses.replace(
        program, seg_ops=tuple(seg_ops), seg_param_ops=tuple(seg_param_ops), live=tuple(live)
    )


def _dead_sites(ops: Sequence[_Op], out_refs, num_sites: int) -> set[int]:
    needed = {r for r in out_refs if not isinstance(r, _Lit)}
    live_sites = set()
    for op in reversed(ops):
        if any(r in needed for r in op.outs):
            needed.update(r for r in op.ins if not isinstance(r, _Lit))
            if op.site is not None:
                live_sites.add(op.site)
    return set(range(num_sites)) - live_sites


def _evaluate(program: _Program, leaves, live_in, bits, start: int, stop: int, mode: str):
    """Segments ``start..stop`` of ``program``: values live at ``start`` in, at ``stop`` out."""
    env: dict[int, Any] = dict(program.const_values)
    env.update(zip(program.param_ids, leaves, strict=True))
    names = (program.x_id,) if start == 0 else program.live[start - 1]
    env.update(zip(names, live_in, strict=True))
    for k in range(start, stop + 1):
        _run_ops(program, program.seg_param_ops[k], env, None, mode)
        _run_ops(program, program.seg_ops[k], env, bits, mode)
    refs = program.live[stop] if stop < len(program.seg_ops) - 1 else program.out_refs
    return tuple(r.value if isinstance(r, _Lit) else env[r] for r in refs)


# ================================================================== interval bounds
# Sound enclosures of every value of the quantized program over a set of allocations (the
# ``bound`` mode of :meth:`QuantizedFn.bound_segments`). A value is either exact (an array) or
# a :class:`_Box` ``[lo, hi]``, elementwise. Rules are interval arithmetic (IBP), computed in
# the value's float dtype and then widened by a bound on the rounding error of the operation,
# so that the enclosure also holds for what the float program computes.


def _u(x) -> float:
    """Twice the unit roundoff of ``x``'s float dtype (float32: ``2^-23``): one rounding,
    with margin."""
    dtype = jnp.result_type(x)
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 2.0**-23


class _Box(tuple):
    """``(lo, hi)``: an elementwise enclosure of an x-dependent value (``lo <= hi``)."""

    __slots__ = ()

    def __new__(cls, lo, hi):
        return super().__new__(cls, (lo, hi))

    lo = property(lambda self: self[0])
    hi = property(lambda self: self[1])


def _ends(v) -> tuple[Any, Any]:
    return (v.lo, v.hi) if isinstance(v, _Box) else (v, v)


def _widen(lo, hi, err) -> _Box:
    """``[lo - err, hi + err]`` (``err``: a bound on the rounding error, broadcastable)."""
    return _Box(lo - err, hi + err)


def _ulps(lo, hi, k: float = 1.0) -> _Box:
    """Widens by ``k`` roundings relative to the magnitude (one elementwise float op)."""
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _widen(lo, hi, k * _u(lo) * mag + jnp.finfo(jnp.result_type(lo)).tiny)


class UnsupportedPrimitiveError(TransformError):
    """The program holds a primitive that interval bounds do not cover."""


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


def _sum_terms(eqn, ends) -> int:
    name = eqn.primitive.name
    if name == "reduce_sum":
        shape = _aval(eqn.invars[0]).shape
        return math.prod(shape[a] for a in eqn.params["axes"]) or 1
    if name == "reduce_window_sum":
        return math.prod(eqn.params["window_dimensions"])
    if name == "cumsum":
        return _aval(eqn.invars[0]).shape[eqn.params["axis"]]
    return 2


def _box_linear(eqn, vals) -> _Box:
    """A conv/dot of boxes or exact arrays: centre/radius form, ``|A| r`` radii."""
    (al, ah), (bl, bh) = _ends(vals[0]), _ends(vals[1])
    ac, ar = (al + ah) / 2, (ah - al) / 2
    bc, br = (bl + bh) / 2, (bh - bl) / 2
    bind = lambda a, b: _bind(eqn, [a, b, *vals[2:]])[0]
    centre = bind(ac, bc)
    radius = jnp.zeros_like(centre)
    if isinstance(vals[1], _Box):
        radius = radius + bind(jnp.abs(ac), br)
    if isinstance(vals[0], _Box):
        radius = radius + bind(ar, jnp.abs(bc))
    if isinstance(vals[0], _Box) and isinstance(vals[1], _Box):
        radius = radius + bind(ar, br)
    # float error of the sums: at most (K + 1) roundings of sum |a||b| (K: terms per output)
    mag = bind(jnp.abs(ac) + ar, jnp.abs(bc) + br)
    out = _aval(eqn.outvars[0])
    terms = _flops(eqn, [_aval(v) for v in eqn.invars], out) // max(2 * math.prod(out.shape), 1)
    u = _u(centre)
    return _widen(centre, centre, radius * (1 + 2 * u) + (terms + 2) * u * mag)


def _box_eqn(eqn, vals: list, where: str, tape: list | None = None) -> list:
    """One equation on exact values and boxes (nested programs recursed into).

    ``tape``: if given, every equation with a box operand is appended as ``("eqn", eqn,
    vals, outs)`` (call bodies as their equations), for the linear relaxation's backward pass.
    """
    if not any(isinstance(v, _Box) for v in vals):
        return _bind(eqn, vals)
    name = eqn.primitive.name
    body = _inline_body(eqn)
    if body is not None:
        return _box_program(body, vals, f"{where}/{name}", tape)
    outs = [_no_nan(o) for o in _box_rule(eqn, vals, where)]
    if tape is not None:
        tape.append(("eqn", eqn, vals, outs))
    return outs


def _no_nan(v):
    """A float box whose ends are NaN (``inf - inf`` after an overflow) becomes unbounded."""
    if not isinstance(v, _Box) or not jnp.issubdtype(jnp.result_type(v.lo), jnp.floating):
        return v
    return _Box(
        jnp.where(jnp.isnan(v.lo), -jnp.inf, v.lo), jnp.where(jnp.isnan(v.hi), jnp.inf, v.hi)
    )


def _box_rule(eqn, vals: list, where: str) -> list:
    """The interval rule of one primitive (at least one operand is a box)."""
    name = eqn.primitive.name
    if name in _MONOTONE_EXACT:
        if name in _INDEXED and any(isinstance(v, _Box) for v in vals[_INDEXED[name] :]):
            raise UnsupportedPrimitiveError(
                f"unsupported primitive {name} with input-dependent indices at {where}"
            )
        los = [v.lo if isinstance(v, _Box) else v for v in vals]
        his = [v.hi if isinstance(v, _Box) else v for v in vals]
        return [_Box(lo, hi) for lo, hi in zip(_bind(eqn, los), _bind(eqn, his), strict=True)]
    if name in _MONOTONE_ROUNDED:
        lo, hi = _ends(vals[0])
        return [_ulps(_bind(eqn, [lo])[0], _bind(eqn, [hi])[0], 4.0)]
    if name in _SUMS:
        los = [_ends(v)[0] for v in vals]
        his = [_ends(v)[1] for v in vals]
        lo, hi = _bind(eqn, los)[0], _bind(eqn, his)[0]
        mags = [jnp.maximum(jnp.abs(a), jnp.abs(b)) for a, b in zip(los, his, strict=True)]
        mag = _bind(eqn, mags)[0]
        return [_widen(lo, hi, (_sum_terms(eqn, vals) + 1) * _u(lo) * mag)]
    if name == "neg":
        lo, hi = _ends(vals[0])
        return [_Box(-hi, -lo)]
    if name == "sub":
        (al, ah), (bl, bh) = _ends(vals[0]), _ends(vals[1])
        return [_ulps(al - bh, ah - bl)]
    if name in ("mul", "div"):
        (al, ah), (bl, bh) = _ends(vals[0]), _ends(vals[1])
        if name == "div":
            if isinstance(vals[1], _Box):
                straddles = (bl <= 0) & (bh >= 0)
                bl, bh = 1 / bh, 1 / bl  # 1/b is decreasing where b keeps its sign
                bl, bh = jnp.where(straddles, -jnp.inf, bl), jnp.where(straddles, jnp.inf, bh)
            else:
                bl = bh = 1 / bl
        prods = [al * bl, al * bh, ah * bl, ah * bh]
        lo, hi = functools.reduce(jnp.minimum, prods), functools.reduce(jnp.maximum, prods)
        out = _ulps(lo, hi, 3.0 if name == "div" else 1.0)
        if name == "div" and isinstance(vals[1], _Box):  # 1 / b unbounded where b may be 0
            out = _Box(
                jnp.where(straddles, -jnp.inf, out.lo), jnp.where(straddles, jnp.inf, out.hi)
            )
        return [out]
    if name in ("integer_pow", "square"):
        k = eqn.params.get("y", 2)
        lo, hi = _ends(vals[0])
        if k < 0:  # x^k for k < 0: monotone on each side of 0, unbounded where 0 is inside
            straddles = (lo <= 0) & (hi >= 0)
            a, b = lo**k, hi**k
            out = _ulps(jnp.minimum(a, b), jnp.maximum(a, b), float(abs(k)) + 2.0)
            return [_Box(jnp.where(straddles, -jnp.inf, out.lo),
                         jnp.where(straddles, jnp.inf, out.hi))]  # fmt: skip
        a, b = lo**k, hi**k
        if k % 2 == 0:
            straddles = (lo < 0) & (hi > 0)
            lo2 = jnp.where(straddles, 0.0, jnp.minimum(a, b))
            return [_ulps(lo2, jnp.maximum(a, b), float(abs(k)))]
        return [_ulps(jnp.minimum(a, b), jnp.maximum(a, b), float(abs(k)))]
    if name == "abs":
        lo, hi = _ends(vals[0])
        straddles = (lo < 0) & (hi > 0)
        small = jnp.where(straddles, 0.0, jnp.minimum(jnp.abs(lo), jnp.abs(hi)))
        return [_Box(small, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))]
    if name == "rsqrt":
        lo, hi = _ends(vals[0])
        return [_ulps(_bind(eqn, [hi])[0], _bind(eqn, [lo])[0], 4.0)]
    if name in _COMPARE:
        (al, ah), (bl, bh) = _ends(vals[0]), _ends(vals[1])
        if name in ("gt", "ge"):
            al, ah, bl, bh = bl, bh, al, ah  # a > b  <=>  b < a
        strict = name in ("gt", "lt")
        surely = (ah < bl) if strict else (ah <= bl)
        maybe = (al < bh) if strict else (al <= bh)
        return [_Box(surely, maybe)]  # boolean box: (surely true, possibly true)
    if name == "select_n":
        pred, cases = vals[0], vals[1:]
        ends = [_ends(c) for c in cases]
        if not isinstance(pred, _Box):
            lo = _bind(eqn, [pred, *[e[0] for e in ends]])[0]
            hi = _bind(eqn, [pred, *[e[1] for e in ends]])[0]
            return [_Box(lo, hi)]
        if len(cases) != 2:
            raise UnsupportedPrimitiveError(f"unsupported primitive {name} (n-ary) at {where}")
        surely, maybe = pred
        union_lo = jnp.minimum(ends[0][0], ends[1][0])
        union_hi = jnp.maximum(ends[0][1], ends[1][1])
        lo = jnp.where(surely, ends[1][0], jnp.where(maybe, union_lo, ends[0][0]))
        hi = jnp.where(surely, ends[1][1], jnp.where(maybe, union_hi, ends[0][1]))
        return [_Box(lo, hi)]
    if _is_conv(eqn) or _is_dot(eqn):
        return [_box_linear(eqn, vals)]
    raise UnsupportedPrimitiveError(
        f"unsupported primitive {name} at {where}: interval bounds cover conv, dot_general, "
        "elementwise arithmetic, monotone activations (relu, tanh, sigmoid, ...), BatchNorm in "
        "inference mode, add/concatenate, pooling and reshapes"
    )


def _box_program(closed, vals: list, where: str, tape: list | None = None) -> list:
    """A nested program (a call body) on exact values and boxes."""
    jaxpr, consts = _open(closed)
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, vals, strict=True))
    read = lambda v: v.val if _is_literal(v) else env[v]
    for eqn in jaxpr.eqns:
        outs = _box_eqn(eqn, [read(v) for v in eqn.invars], where, tape)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _quant_error(v, bits):
    """The elementwise bound ``|x_hat - x| <= delta`` of the quantizer at ``bits`` (or any
    more) for ``x`` in box ``v`` (see :func:`_quantized_box`)."""
    lo, hi = _ends(v)
    r = jnp.maximum(jnp.max(hi), 0.0) - jnp.minimum(jnp.min(lo), 0.0)
    u = _u(r)
    r = r * (1 + 2 * u)
    n = (jnp.left_shift(1, bits) - 1).astype(r.dtype)
    s = r / n * (1 + 2 * u)
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return 0.5 * s + 4 * u * (r + s) + u * mag


def _quantized_box(v, bits) -> _Box:
    """Encloses ``fake_quant_activation(x, b)`` for every ``x`` in ``v`` and every ``b >= bits``.

    One example (the per-example program): with ``r`` an upper bound on ``max(hi, 0) -
    min(lo, 0)``, the step is ``s <= r / (2^bits - 1)``, and ``|x_hat - x| <= s / 2`` (rounding
    to the nearest level; the zero point is an integer and the clip at the top level moves a
    value by less than half a step, since ``z = round(-lo / s)``). The float computation of
    ``x * (1 / s)`` adds at most ``~4 u |x / s|`` steps, and of ``s * (q - z)`` one rounding.
    The sign of ``x`` is kept: ``x >= 0`` gives ``x_hat >= 0`` and ``x <= 0`` gives
    ``x_hat <= 0``, so exact zeros stay zero.
    """
    lo, hi = _ends(v)
    delta = _quant_error(v, bits)
    qlo = jnp.where(lo >= 0, jnp.maximum(lo - delta, 0.0), lo - delta)
    qhi = jnp.where(hi <= 0, jnp.minimum(hi + delta, 0.0), hi + delta)
    return _Box(qlo, qhi)


def _quantized_hull(x, bits) -> _Box:
    """The elementwise hull of ``fake_quant_activation(x, b)`` over ``bits <= b <= 16`` for an
    exact ``x`` (one example): each quantized value computed, not bounded."""
    lo = hi = x
    for b in range(quant.MIN_BITS, quant.MAX_BITS + 1):
        xq = quant.fake_quant_activation(x, jnp.asarray(b, jnp.int32))
        lo = jnp.where(b >= bits, jnp.minimum(lo, xq), lo)
        hi = jnp.where(b >= bits, jnp.maximum(hi, xq), hi)
    return _Box(lo, hi)


def _box_ops(
    program: _Program, ops: Sequence[int], env: dict[int, Any], bits, tape: list | None = None
) -> None:
    """``program.ops[i] for i in ops`` on exact values and boxes; ``bits`` int ``[L]`` holds
    each site's smallest bit-width (one example, the per-example program). ``tape``: see
    :func:`_box_eqn`; quantizers are recorded as ``("quant" | "hull", site, x, x_hat)``."""
    read = lambda ref: ref.value if isinstance(ref, _Lit) else env[ref]
    for i in ops:
        op = program.ops[i]
        vals = [read(r) for r in op.ins]
        where = _name_stack(op.eqn) or f"op {i} ({op.eqn.primitive.name})"
        if op.weight is None and op.site is None:
            outs = _box_eqn(op.eqn, vals, where, tape)
        else:
            if op.site is not None:
                for d in op.data:
                    exact = not isinstance(vals[d], _Box)
                    q = (_quantized_hull if exact else _quantized_box)(vals[d], bits[op.site])
                    if tape is not None:
                        tape.append(("hull" if exact else "quant", op.site, vals[d], q))
                    vals[d] = q
            if op.weight is not None:
                vals[op.weight] = _prepared_weight(program, op, vals[op.weight])
            outs = _box_eqn(op.eqn, vals, where, tape)
        for r, v in zip(op.outs, outs, strict=True):
            env[r] = v


def _bound(
    program: _Program,
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
        _run_ops(program, program.seg_param_ops[start], env, None, "fake")
        cut = program.live[start] if start < last else program.out_refs
        runs = []
        for b in choices:
            env_b = dict(env)
            _run_ops(program, program.seg_ops[start], env_b, bits.at[start - 1].set(b), "fake")
            runs.append([r.value if isinstance(r, _Lit) else env_b[r] for r in cut])
        boxes = []
        for j, r in enumerate(cut):
            if isinstance(r, _Lit):
                continue
            vs = [run[j] for run in runs]
            big = jnp.asarray(jnp.inf, vs[0].dtype)
            pairs = list(zip(allowed, vs, strict=True))
            lo = functools.reduce(jnp.minimum, [jnp.where(a, v, big) for a, v in pairs])
            hi = functools.reduce(jnp.maximum, [jnp.where(a, v, -big) for a, v in pairs])
            env[r] = _Box(lo, hi)
            boxes.append((env[r], vs))
        if tape is not None:
            tape.append(("split", start - 1, boxes, allowed))
        first = start + 1
    for k in range(first, stop + 1):
        _run_ops(program, program.seg_param_ops[k], env, None, "fake")
        _box_ops(program, program.seg_ops[k], env, bits, tape)
    refs = program.live[stop] if stop < last else program.out_refs
    raw = tuple(r.value if isinstance(r, _Lit) else env[r] for r in refs)
    return raw if tape is not None else tuple(_ends(v) for v in raw)


# Affine in their box operands (the others exact): the backward pass is their transpose.
_AFFINE = {
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "concatenate", "pad", "rev", "reduce_sum", "reduce_window_sum",
    "cumsum", "copy", "copy_p", "dynamic_slice", "gather", "dynamic_update_slice",
}  # fmt: skip


def _is_affine(eqn, vals) -> bool:
    name = eqn.primitive.name
    boxes = [isinstance(v, _Box) for v in vals]
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
      tape: from :func:`_bound`; out: its output box (``[1, C]`` logits); spec: ``[K, 1, C]``.
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
        lo, hi = _ends(box)
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
                lo, hi = _ends(x)
                for b in choices:
                    delta = _quant_error(x, jnp.asarray(b, jnp.int32))
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
        pos = [i for i, v in enumerate(vals) if isinstance(v, _Box)]
        if _is_affine(eqn, vals):

            def f(*boxes, eqn=eqn, vals=vals, pos=pos):
                full = list(vals)
                for i, b in zip(pos, boxes, strict=True):
                    full[i] = b
                return _bind(eqn, full)

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
    return bias + best - 2.0**11 * _u(bias) * mag - 1e-6


# ================================================================== the public surface
class QuantizedFn:
    """``fn`` under dynamic PTQ: ``qfn(params, x, bits=None) -> fn's output``.

    Built by :func:`quantize`; see the module docstring for the site rules.

    Attributes:
      num_sites: ``L``, the number of activation sites.
      site_names: their names, in ``bits`` column order (program order).
      sites: one :class:`Site` per site.
      weight_bits: the static weight bit-width (``None``: full-precision weights).
      fn: the original function (the full-precision path).
    """

    def __init__(
        self,
        fn: Callable,
        program: _Program,
        sites: tuple[Site, ...],
        treedef,
        in_avals,
        x_aval,
        out_tree,
        options,
    ):
        self.fn = fn
        self._program = program
        self.sites = sites
        self.num_sites = len(sites)
        self.site_names = tuple(s.name for s in sites)
        self.weight_bits = program.weight_bits
        self._treedef = treedef
        self._param_avals = in_avals
        self._x_aval = x_aval
        self._out_tree = out_tree
        self._options = options
        self._batched: dict[int, _Program | None] = {}

    def __repr__(self) -> str:
        return f"QuantizedFn({self.num_sites} sites: {', '.join(self.site_names)})"

    def describe(self) -> str:
        """A markdown table of the sites: name, op, shapes, share of the FLOPs."""
        rows = [
            "| # | site | op | input | weight | output | FLOPs share |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.sites:
            rows.append(
                f"| {s.index} | {s.name} | {s.op} | {list(s.data_shape[1:])} | "
                f"{list(s.weight_shape) if s.weight_shape else '-'} | {list(s.out_shape[1:])} | "
                f"{100 * s.flops_share:.1f}% |"
            )
        return "\n".join(rows)

    # ------------------------------------------------------------------ calling
    def _leaves(self, params) -> list[jax.Array]:
        leaves, treedef = jax.tree.flatten(params)
        if treedef != self._treedef:
            raise ValueError(
                f"params have another structure than the ones quantize() traced: {treedef} "
                f"vs {self._treedef}"
            )
        for leaf, aval in zip(leaves, self._param_avals, strict=True):
            if tuple(jnp.shape(leaf)) != tuple(aval.shape):
                raise ValueError(
                    f"a parameter has shape {jnp.shape(leaf)}, quantize() traced {aval.shape}"
                )
        return leaves

    def _check_x(self, x) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(self._x_aval.shape[1:]):
            raise ValueError(
                f"x must be [B, {', '.join(map(str, self._x_aval.shape[1:]))}] like the example "
                f"quantize() traced, got shape {x.shape}; call quantize() again with an "
                "example of the new shape"
            )
        return x.astype(self._x_aval.dtype)

    def _check_bits(self, bits, batch: int) -> jax.Array:
        bits = jnp.asarray(bits)
        if not jnp.issubdtype(bits.dtype, jnp.integer):
            raise TypeError(f"bits must be an integer array, got dtype {bits.dtype}")
        if bits.shape != (batch, self.num_sites):
            raise ValueError(
                f"bits must be [B, L] = [{batch}, {self.num_sites}] for sites "
                f"{list(self.site_names)}, got shape {bits.shape}"
            )
        return bits

    def __call__(
        self,
        params: Any,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        mode: Literal["fake", "integer"] = "fake",
    ) -> Any:
        """Evaluates the program.

        Args:
          params: a pytree like the one given to :func:`quantize` (may be traced).
          x: ``[B, ...]``, each example shaped like the traced example.
          bits: int ``[B, L]`` activation bit-widths (traced or not), or ``None`` for full
            precision (``fn(params, x)`` itself, statically chosen). For ``P`` policies use
            ``jax.vmap(lambda b: qfn(params, x, b))(bits_pbl)``.
          mode: ``"fake"``: fake quantization in float (differentiable, straight-through);
            ``"integer"``: every site computed on integer codes with int32 accumulation
            (``preferred_element_type``), then rescaled by the activation and weight scales
            (needs ``weight_bits``; the first layer, which is not a site, stays in float).

        Returns:
          ``fn``'s output pytree, every leaf ``[B, ...]``.
        """
        if bits is None:
            return self.fn(params, x)
        if mode not in ("fake", "integer"):
            raise ValueError(f"mode must be 'fake' or 'integer', got {mode!r}")
        if mode == "integer" and self.weight_bits is None:
            raise ValueError("integer mode needs quantized weights (weight_bits is None)")
        x = self._check_x(x)
        bits = self._check_bits(bits, x.shape[0])
        leaves = self._leaves(params)
        batched = self._batched_program(x.shape[0])
        if batched is not None:  # the program traced at this batch size: no vmap needed
            outs = _evaluate(batched, leaves, (x,), bits, 0, len(batched.seg_ops) - 1, mode)
            return jax.tree.unflatten(self._out_tree, list(outs))
        last = len(self._program.seg_ops) - 1
        run = lambda xi, bi: self._segments(leaves, (xi[None],), bi, 0, last, mode)
        outs = jax.vmap(run)(x, bits)
        return jax.tree.unflatten(self._out_tree, [o[:, 0] for o in outs])

    def _batched_program(self, batch: int) -> _Program | None:
        """The program traced at ``batch`` with every site's batch axis located, if it can be.

        Gradients through the vmapped per-example program cost up to ~1.4x more on XLA:CPU
        (the backward pass of per-example quantizers does not fuse as well), so where the
        batched trace is the same program as the per-example one and every site's batch axis
        is found by comparing the two, the batched program runs instead: the same ops with the
        ranges reduced per slice of that axis. ``None``: fall back to the vmapped program.
        """
        if batch not in self._batched:
            x_aval = jax.ShapeDtypeStruct((batch, *self._x_aval.shape[1:]), self._x_aval.dtype)
            try:
                builder, ops, param_ids, x_id, out_refs, _, _ = _flatten(
                    self.fn, self._treedef, self._param_avals, x_aval, self._options
                )
            except (TransformError, ValueError, TypeError):
                self._batched[batch] = None
                return None
            axes = _batch_axes(self._program, ops, builder.avals, batch)
            self._batched[batch] = None if axes is None else _make_program(
                builder, ops, param_ids, x_id, out_refs,
                self._program.site_ops, self._program.weight_bits, axes,
            )  # fmt: skip
        return self._batched[batch]

    def _segments(self, leaves, live_in, bits_l, start: int, stop: int, mode: str):
        """Segments ``start..stop`` of one example: values live at ``start`` in, at ``stop`` out."""
        return _evaluate(self._program, leaves, live_in, bits_l, start, stop, mode)

    # ------------------------------------------------------------------ prefix cuts
    @property
    def num_segments(self) -> int:
        """``L + 1``: segment 0 runs up to the first site's quantizer, segment ``k`` from site
        ``k - 1``'s quantizer to site ``k``'s (the last one to the output)."""
        return len(self._program.seg_ops)

    def run_segments(
        self,
        params: Any,
        live: Any,
        site_bits: ArrayLike,
        start: int,
        stop: int,
        *,
        mode: Literal["fake", "integer"] = "fake",
    ) -> Any:
        """Runs segments ``start..stop`` (inclusive) on a batch, in quantized mode.

        Args:
          params: as for ``__call__``.
          live: the batch's values live at the cut before segment ``start``: ``x [B, ...]``
            for ``start == 0``, else the tuple this method returned for segment ``start - 1``.
          site_bits: int ``[B, L]`` or ``[L]`` (one allocation for every example); only the
            columns of the sites in the segments are read.
          start, stop: segment indices, ``0 <= start <= stop <= L``.
          mode: as for ``__call__``.

        Returns:
          The tuple of values live after segment ``stop`` (each ``[B, ...]``), or, when
          ``stop == L``, ``fn``'s output pytree.
        """
        leaves, live, site_bits, lift = self._segment_inputs(params, live, site_bits, start, stop)
        run = lambda lv, b: self._segments(leaves, lift(lv), b, start, stop, mode)
        outs = jax.vmap(run)(live, site_bits)
        if stop == self.num_segments - 1:
            return jax.tree.unflatten(self._out_tree, [o[:, 0] for o in outs])
        return outs

    def _segment_inputs(self, params, live, site_bits, start: int, stop: int):
        """Checked inputs of :meth:`run_segments` / :meth:`bound_segments`: ``(leaves, live,
        site_bits [B, L], lift)``, ``lift`` mapping one example's live values to the traced
        per-example shapes (batch axis of size 1 for the input; others as the program has
        them; live values are stacked along a new leading axis)."""
        if not 0 <= start <= stop < self.num_segments:
            raise ValueError(f"segments must satisfy 0 <= {start} <= {stop} <= {self.num_sites}")
        leaves = self._leaves(params)
        live = (self._check_x(live),) if start == 0 else tuple(live)
        batch = jnp.shape(live[0])[0]
        site_bits = jnp.asarray(site_bits)
        if site_bits.ndim == 1:
            site_bits = jnp.broadcast_to(site_bits, (batch, self.num_sites))
        site_bits = self._check_bits(site_bits, batch)
        lift = (lambda lv: (lv[0][None],)) if start == 0 else (lambda lv: lv)
        return leaves, live, site_bits, lift

    def bound_segments(
        self, params: Any, live: Any, site_bits: ArrayLike, start: int, stop: int
    ) -> Any:
        """Encloses what segments ``start..stop`` compute for every allowed allocation.

        Interval bound propagation (IBP) through the same program as :meth:`run_segments`:
        the values live at the cut before ``start`` are exact; each site in the segments
        quantizes its data operand with an error bounded for *every* bit-width of at least
        ``site_bits[:, l]`` (the step is largest at the smallest one, and the range is bounded
        from the operand's enclosure); everything downstream is interval arithmetic, widened
        by the float rounding error of each operation, so the enclosure holds for the float
        program too (tests/test_certify.py checks it against enumerated allocations).

        Args:
          params: as for ``__call__``.
          live: as for :meth:`run_segments` (exact values).
          site_bits: int ``[B, L]`` or ``[L]``: the smallest bit-width each site may take.
          start, stop: segment indices, ``0 <= start <= stop <= L``.

        Returns:
          ``(lo, hi)`` pairs: for ``stop == L`` a pair of ``fn``'s output pytrees (e.g. logit
          bounds ``[B, C]`` each), else a tuple with one ``(lo, hi)`` per live value.

        Raises:
          UnsupportedPrimitiveError: a primitive without an interval rule (the error names it
            and where it is).
        """
        leaves, live, site_bits, lift = self._segment_inputs(params, live, site_bits, start, stop)
        run = lambda lv, b: _bound(self._program, leaves, lift(lv), b, start, stop)
        outs = jax.vmap(run)(live, site_bits)
        if stop == self.num_segments - 1:
            lo = jax.tree.unflatten(self._out_tree, [o[0][:, 0] for o in outs])
            hi = jax.tree.unflatten(self._out_tree, [o[1][:, 0] for o in outs])
            return lo, hi
        return outs

    def bound_margins(
        self,
        params: Any,
        live: Any,
        labels: ArrayLike,
        site_bits: ArrayLike,
        start: int,
        *,
        choices: Sequence[int] | None = None,
        remaining: ArrayLike | None = None,
    ) -> jax.Array:
        """Lower bounds of the logit margins ``logit[y] - logit[j]`` over allowed allocations.

        From the exact values live at the cut before segment ``start`` to the logits (``fn``
        must return one ``[B, C]`` array). Intervals alone (:meth:`bound_segments`, every site
        at its ``site_bits``) give ``lo[y] - hi[j]``. With ``choices`` and ``remaining`` the
        allocations are those whose sites ``start - 1 ..`` take bits in ``choices`` summing to
        ``remaining`` exactly, and a linear relaxation (CROWN-style, see
        ``_linear_bound``) is added: the margin itself is propagated backward as a linear
        function, and the site terms are minimised jointly under the budget; the larger of
        the two bounds is returned (both are sound).

        Args:
          params, live: as for :meth:`run_segments` (``start >= 1``).
          labels: int ``[B]``.
          site_bits: int ``[B, L]``: each site's smallest allowed bit-width.
          start: the segment to start from.
          choices: the bit choices (static); remaining: int ``[B]``.

        Returns:
          float ``[B, C]``: the lower bounds; ``+inf`` at ``j == y``.
        """
        if not 1 <= start < self.num_segments:
            raise ValueError(f"start must be in [1, {self.num_sites}], got {start}")
        leaves = self._leaves(params)
        live = tuple(live)
        batch = jnp.shape(live[0])[0]
        site_bits = self._check_bits(jnp.asarray(site_bits), batch)
        labels = jnp.asarray(labels, jnp.int32)
        linear = choices is not None
        if linear:
            choices = tuple(int(c) for c in choices)
            remaining = jnp.broadcast_to(jnp.asarray(remaining, jnp.int32), (batch,))
        else:
            remaining = jnp.zeros((batch,), jnp.int32)
        last = self.num_segments - 1

        def one(lv, b, y, rem):
            tape: list | None = [] if linear else None
            split = None
            if linear:  # the first site's choices that leave a feasible rest (a superset)
                left = self.num_sites - start  # sites after the first
                cs = jnp.asarray(choices)
                allowed = (cs >= b[start - 1]) & (rem - cs >= left * min(choices))
                allowed &= rem - cs <= left * max(choices)
                split = (choices, [allowed[j] for j in range(len(choices))])
            outs = _bound(self._program, leaves, lv, b, start, last, tape, split)
            if len(outs) != 1:
                raise ValueError("bound_margins needs fn to return one logits array")
            out = outs[0]
            lo, hi = _ends(out) if linear else out
            num_classes = lo.shape[-1]
            onehot = jax.nn.one_hot(y, num_classes, dtype=lo.dtype)
            ibp = lo[0, y] - hi[0]
            if linear:
                spec = (onehot[None] - jnp.eye(num_classes, dtype=lo.dtype))[:, None, :]
                crown = _linear_bound(tape, out, spec, choices, rem, start - 1, self.num_sites)
                ibp = jnp.maximum(ibp, jnp.where(jnp.isnan(crown), -jnp.inf, crown))
            ibp = jnp.where(jnp.isnan(ibp), -jnp.inf, ibp)
            return jnp.where(onehot > 0, jnp.inf, ibp)

        return jax.vmap(one)(live, site_bits, labels, remaining)


def _site_name(
    producer: dict[int, _Op], builder: _Builder, op: _Op, param_paths: dict[int, str], index: int
) -> str:
    """The module path of the site's weight, or the equation's name stack, or a generated name.

    ``producer``: value id -> the op that computes it.
    """
    if op.weight is not None:
        ref = op.ins[op.weight]
        # follow parameter-only unary ops (casts, reshapes, transposes) back to a leaf
        while not isinstance(ref, _Lit) and ref in producer:
            nxt = [r for r in producer[ref].ins if not isinstance(r, _Lit) and not builder.xdep[r]]
            if len(nxt) != 1:
                break
            ref = nxt[0]
        if not isinstance(ref, _Lit) and ref in param_paths and param_paths[ref]:
            return param_paths[ref]
    stack = _name_stack(op.eqn)
    if stack:
        return stack
    kind = "conv" if _is_conv(op.eqn) else "dot_general"
    return f"{kind}_{index}"


_COLLECTIONS = {"params", "variables", "value"}


def _path_name(path) -> str:
    """``('params', 'Conv_0', 'kernel')`` -> ``Conv_0``; NNX ``conv2/kernel/value`` -> ``conv2``."""
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        keys.append(str(key))
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    keys = keys[:-1] if len(keys) > 1 else keys  # drop the leaf's own name (kernel, w)
    while len(keys) > 1 and keys[0] in _COLLECTIONS:
        keys = keys[1:]
    return "/".join(keys)


def _flatten(fn, treedef, avals, x_aval, options):
    """Traces ``fn`` at ``x_aval`` and flattens it: ``(builder, ops, param_ids, x_id,
    out_refs, out_tree, dead_sites)`` with the sites that do not reach the output unnumbered."""
    out_tree_box = []

    def flat_fn(leaf_list, xi):
        out = fn(jax.tree.unflatten(treedef, leaf_list), xi)
        flat, tree = jax.tree.flatten(out)
        out_tree_box.append(tree)
        return flat

    closed = _trace(flat_fn, avals, x_aval)
    builder = _Builder(*options)
    param_ids = [builder.new(a, False, False) for a in avals]
    x_id = builder.new(x_aval, True, False)
    out_refs = builder.add(closed, [*param_ids, x_id], "")
    batch = x_aval.shape[0]
    for r in out_refs:
        shape = (batch,) if isinstance(r, _Lit) else builder.avals[r].shape
        if not shape or shape[0] != batch:
            raise ValueError(
                f"every output of fn must have a leading batch axis; traced at batch {batch} an "
                f"output has shape {tuple(shape)}"
            )
    dead = _dead_sites(builder.ops, out_refs, builder.num_sites)
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
    if _is_conv(eqn):
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


def _make_program(
    builder, ops, param_ids, x_id, out_refs, site_ops, weight_bits, batch_axes=None
) -> _Program:
    """The :class:`_Program` of a flattened trace, cut at its sites (:func:`_analyse`)."""
    return _analyse(
        _Program(
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


def _batch_axes(reference: _Program, ops_b, avals_b, batch: int):
    """Per site op of the batch-``B`` program: the batch axis of each data operand and of the
    output, or ``None`` (then the per-example program is vmapped instead).

    The two traces must be the same program (same primitives in the same order, the same
    sites); a data operand's batch axis is the one axis whose size is 1 at batch 1 and ``B``
    at batch ``B``, every other axis equal.
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
        ndims = [len(avals_b[r].shape) if not isinstance(r, _Lit) else 0 for r in b.ins[:2]]
        out_axis = _out_batch_axis(b.eqn, b.data, found, ndims)
        if out_axis is None:
            return None
        axes[i] = (tuple(found), out_axis)
    return axes


def _example_pair(x: jax.Array) -> jax.Array:
    if x.shape[0] >= 2:
        return x[:2]
    return jnp.concatenate([x, 0.5 * x[::-1] + 0.25])


def quantize(
    fn: Callable[[Any, jax.Array], Any],
    params: Any,
    example_input: ArrayLike,
    *,
    weight_bits: int | None = 8,
    quantize_first: bool = False,
    activation_products: ActivationProducts = "skip",
    check: bool = True,
) -> QuantizedFn:
    """Derives a model's quantization sites from its program; returns the quantized function.

    Args:
      fn: ``fn(params, x) -> output`` (a pytree of ``[B, ...]`` arrays, usually logits
        ``[B, C]``), any traceable JAX function in inference mode (BatchNorm on running
        statistics, no dropout).
      params: the pytree ``fn`` takes (linen variables, an NNX state, a dict of arrays...);
        concrete arrays or ``jax.ShapeDtypeStruct`` s (then ``check`` is skipped).
      example_input: ``[B, ...]``, ``B >= 1``: fixes the per-example shape and dtype.
      weight_bits: static weight bit-width for every conv/dot parameter operand (``None``:
        full-precision weights).
      quantize_first: also make the layer that reads the raw input a site.
      activation_products: what a conv/dot of two activations is (module docstring).
      check: verify on ``example_input`` that the per-example program equals ``fn`` on a
        batch (refuses models that mix examples).

    Returns:
      A :class:`QuantizedFn` with ``num_sites``, ``site_names`` and ``sites``.

    Raises:
      TransformError: no site found (or every site dead), a site inside a loop or branch, an
        activation product with ``activation_products="error"``, a model that mixes examples.
      ValueError: a batch-less example input, or an output without a leading batch axis.
    """
    if weight_bits is not None and not quant.MIN_BITS <= int(weight_bits) <= quant.MAX_BITS:
        raise ValueError(
            f"weight_bits must be None or in [{quant.MIN_BITS}, {quant.MAX_BITS}], "
            f"got {weight_bits}"
        )
    if activation_products not in ("skip", "quantize", "error"):
        raise ValueError(
            "activation_products must be 'skip', 'quantize' or 'error', "
            f"got {activation_products!r}"
        )
    if params is None:
        raise TypeError(
            "params is None: pass the variables fn takes, e.g. quantize(module.apply, "
            "variables, x) for a flax.linen module"
        )
    x = example_input
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    if len(x_aval.shape) < 1 or x_aval.shape[0] < 1:
        raise ValueError(f"example_input must be [B, ...] with B >= 1, got shape {x_aval.shape}")
    one = jax.ShapeDtypeStruct((1, *x_aval.shape[1:]), x_aval.dtype)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    avals = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    options = (activation_products, quantize_first)
    builder, ops, param_ids, x_id, out_refs, out_tree, dead = _flatten(
        fn, treedef, avals, one, options
    )
    if dead:
        warnings.warn(
            f"{len(dead)} conv/dot site(s) do not reach the output and are ignored", stacklevel=2
        )
    site_ops = tuple(i for i, op in enumerate(ops) if op.site is not None)
    if not site_ops:
        raise TransformError(
            "no quantization site found: the program has no conv_general_dilated/dot_general "
            "between two x-dependent layers that reaches the output"
            + (
                ""
                if quantize_first
                else " (the layer reading the raw input is not a site; "
                "quantize_first=True makes it one)"
            )
            + ", so bits would have no effect"
        )
    weight_bits = None if weight_bits is None else int(weight_bits)
    program = _make_program(builder, ops, param_ids, x_id, out_refs, site_ops, weight_bits)

    paths = {
        pid: _path_name(path) for pid, (path, _) in zip(param_ids, leaves_with_path, strict=True)
    }
    linear = [(i, op) for i, op in enumerate(ops) if _is_conv(op.eqn) or _is_dot(op.eqn)]
    flops = {
        i: _flops(
            op.eqn,
            [
                builder.avals[r] if not isinstance(r, _Lit) else _aval(v)
                for r, v in zip(op.ins, op.eqn.invars, strict=True)
            ],
            builder.avals[op.outs[0]],
        )
        for i, op in linear
    }
    total = max(sum(flops.values()), 1)
    sites, seen = [], {}
    producer = {r: o for o in ops for r in o.outs}
    for i in site_ops:
        op = ops[i]
        name = _site_name(producer, builder, op, paths, op.site)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        d = op.ins[op.data[0]]
        w = op.ins[op.weight] if op.weight is not None else None
        kind = "matmul" if op.weight is None else ("conv" if _is_conv(op.eqn) else "dense")
        sites.append(
            Site(
                index=op.site,
                name=name,
                op=kind,
                data_shape=tuple(builder.avals[d].shape),
                weight_shape=None if w is None else tuple(builder.avals[w].shape),
                out_shape=tuple(builder.avals[op.outs[0]].shape),
                flops=int(flops[i]),
                flops_share=flops[i] / total,
            )
        )
    qfn = QuantizedFn(fn, program, tuple(sites), treedef, avals, x_aval, out_tree, options)
    if (
        check
        and not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        and not isinstance(x, jax.ShapeDtypeStruct)
    ):
        _check_per_example(qfn, params, jnp.asarray(x))
    return qfn


def _check_per_example(qfn: QuantizedFn, params, x: jax.Array) -> None:
    """Refuses programs whose batched output differs from the per-example program's."""
    pair = _example_pair(x)
    batched = jax.tree.leaves(qfn.fn(params, pair))
    leaves = qfn._leaves(params)
    last = qfn.num_segments - 1
    one = lambda xi: qfn._segments(leaves, (xi[None],), None, 0, last, "fake")
    per_example = jax.vmap(one)(pair)
    for a, b in zip(batched, per_example, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b[:, 0], np.float64)
        if a.shape != b.shape or not np.allclose(
            a, b, rtol=1e-4, atol=1e-5 * (1 + np.abs(a).max())
        ):
            diff = np.abs(a - b).max() if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
            raise TransformError(
                "fn mixes examples: on a batch of 2 its output differs from the same program "
                f"run on each example alone (max difference {diff}). Quantized evaluation is per "
                "example; run fn in inference mode (BatchNorm on running statistics: "
                "train=False / use_running_average=True for linen, model.eval() for NNX)"
            )
