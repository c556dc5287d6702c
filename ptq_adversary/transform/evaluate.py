"""Evaluating a :class:`~ptq_adversary.transform.program.Program` with quantization at its sites.

Every op is re-bound on concrete (or traced) values; at a site, the data operand is
fake-quantized per example at ``bits[:, l]`` (dynamic, asymmetric,
:func:`~ptq_adversary.quant.fake_quant_activation`), and the parameter operand of every
conv/dot (site or not) per output channel at the program's static ``weight_bits``
(:func:`~ptq_adversary.quant.fake_quant_weight`). In ``"integer"`` mode a site is computed on
integer codes with int32 accumulation, then rescaled by the activation and weight scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import quant
from ptq_adversary.transform import shim
from ptq_adversary.transform.program import Lit, Op, Program

__all__ = ["evaluate_segments", "prepared_weight", "run_ops"]


def _weight_channel_axes(eqn: Any, weight: int, ndim: int) -> tuple[int, ...]:
    """Axes of the weight operand that index output channels (the rest are reduced)."""
    if shim.is_conv(eqn):
        return (eqn.params["dimension_numbers"].rhs_spec[0],)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contracting = set(lc if weight == 0 else rc)
    return tuple(a for a in range(ndim) if a not in contracting)


def _weight_scale_in_output(eqn: Any, weight: int, scale: jax.Array, out_ndim: int) -> jax.Array:
    """A per-channel weight scale (keepdims, weight layout) laid out to broadcast on the output."""
    if shim.is_conv(eqn):
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


def run_ops(program: Program, ops: Sequence[int], env: dict[int, Any], bits, mode: str):
    """Evaluates ``program.ops[i] for i in ops`` on ``env`` (value id -> value, updated).

    ``bits``: ``None`` (no quantization), int ``[L]`` for the per-example program (one
    example, vmapped by the caller) or int ``[B, L]`` for a batched program (one whose
    ``batch_axes`` locate every site's batch axis). ``mode``: ``"fake"`` or ``"integer"``.
    """

    def read(ref):
        return ref.value if isinstance(ref, Lit) else env[ref]

    for i in ops:
        op = program.ops[i]
        invals = [read(r) for r in op.ins]
        if bits is None or (op.weight is None and op.site is None):
            outs = shim.bind(op.eqn, invals)
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


def _linear_op(program: Program, index: int, invals: list, bits, mode: str) -> list:
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
        (acc,) = shim.bind(op.eqn, invals, preferred_element_type=np.dtype(np.int32))
        out = acc.astype(jnp.float32)
        if batched:
            shape = [1] * out.ndim
            shape[out_axis] = out_scale.shape[0]
            out = out * out_scale.reshape(shape)
        else:
            out = out * out_scale[0]
        if w_scale is not None:
            out = out * _weight_scale_in_output(op.eqn, op.weight, w_scale, out.ndim)
        return [out.astype(shim.aval(op.eqn.outvars[0]).dtype)]
    if op.site is not None:
        for k, d in enumerate(op.data):
            axis = in_axes[k] if batched else None
            rows = quant.fake_quant_activation(_per_example(invals[d], axis), site_bits)
            invals[d] = _from_per_example(rows, invals[d], axis)
    if op.weight is not None:
        invals[op.weight] = prepared_weight(program, op, invals[op.weight])
    return shim.bind(op.eqn, invals)


def prepared_weight(program: Program, op: Op, w: jax.Array) -> jax.Array:
    """A conv/dot's parameter operand ``w`` (its shape) as the quantized program uses it:
    fake-quantized per output channel at ``program.weight_bits`` (unchanged if ``None``)."""
    if program.weight_bits is None:
        return w
    axes = _weight_channel_axes(op.eqn, op.weight, w.ndim)
    return quant.fake_quant_weight(w, program.weight_bits, channel_axis=axes)


def evaluate_segments(program: Program, leaves, live_in, bits, start: int, stop: int, mode: str):
    """Segments ``start..stop`` of ``program``: values live at ``start`` in, at ``stop`` out.

    Args:
      leaves: the parameter leaves (``program.param_ids`` order).
      live_in: the values live at the cut before ``start`` (``(x,)`` for ``start == 0``), in
        ``program.live[start - 1]`` order.
      bits: as for :func:`run_ops`; mode: ``"fake"`` or ``"integer"``.

    Returns:
      The tuple of values live after ``stop`` (``program.live[stop]`` order), or for the last
      segment the flat outputs (``program.out_refs``).
    """
    env: dict[int, Any] = dict(program.const_values)
    env.update(zip(program.param_ids, leaves, strict=True))
    names = (program.x_id,) if start == 0 else program.live[start - 1]
    env.update(zip(names, live_in, strict=True))
    for k in range(start, stop + 1):
        run_ops(program, program.seg_param_ops[k], env, None, mode)
        run_ops(program, program.seg_ops[k], env, bits, mode)
    refs = program.live[stop] if stop < len(program.seg_ops) - 1 else program.out_refs
    return tuple(r.value if isinstance(r, Lit) else env[r] for r in refs)
