"""Fake quantizers with traced bit-widths: the numerical core of ptq_adversary.

Everything here is pure JAX (no Flax, no config, no I/O). Bit-widths are **data**: integer
arrays that may be traced, so one compiled function serves every bit allocation and
``jax.vmap`` over a leading policy axis of ``bits`` just works.

Conventions (written down because quantizers disagree on them):

* Activations are quantized dynamically, **per example** and per tensor, with an asymmetric
  min/max range that always contains zero (PyTorch's observer convention, so 0.0 is exactly
  representable)::

      lo = min(min x, 0)      hi = max(max x, 0)      n = 2^b - 1
      s  = (hi - lo) / n      z  = round(-lo / s)
      q  = clip(round(x * (1 / s)) + z, 0, n)          x_hat = s * (q - z)

  The reduction runs over every axis but the batch axis, so one example's output never depends
  on the others. ``x * (1 / s)`` (not ``x / s``) is what PyTorch's
  ``fake_quantize_per_tensor_affine`` computes, so per example we match it bit for bit.
  Rounding is round-half-to-even (``jnp.round``, like C's ``nearbyint``).
* Weights are quantized statically, symmetrically, per output channel with the **restricted**
  integer range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (no ``-2^(b-1)`` level, so the grid is symmetric
  around zero)::

      s = max|w| / (2^(b-1) - 1)       w_hat = s * clip(round(w * (1 / s)), -qmax, qmax)

* Gradients use the straight-through estimator: the forward value is the quantized one, the
  backward pass is the identity in ``x`` (``x + stop_gradient(x_hat - x)``). No gradient flows
  into the range statistics. Because the range always covers the data, nothing is clipped, so
  the identity is also the clipped-STE gradient.
* Degenerate ranges: an all-zero example (``hi == lo``) or an all-zero weight channel comes back
  unchanged, and finite inputs never produce NaN or inf. Scales beyond ``2^64`` (ranges no
  network produces) are handled with an exact power-of-two rescaling, because XLA flushes their
  subnormal reciprocal to zero, and activations there are clipped to their range.

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018 (affine scheme, zero point).
  Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013 (STE).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "fake_quant_activation",
    "fake_quant_weight",
    "quantize_activation",
    "quantize_weight",
    "straight_through",
]

#: Smallest and largest bit-width the quantizers are defined and tested for. Below 2 bits the
#: symmetric weight grid is empty; above 16 float32 cannot hold the levels exactly.
MIN_BITS = 2
MAX_BITS = 16


def straight_through(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Returns ``x_hat`` in the forward pass with the identity gradient w.r.t. ``x``."""
    return x + jax.lax.stop_gradient(x_hat - x)


def _num_levels_minus_one(bits: jax.Array, dtype) -> jax.Array:
    # 2^b - 1 computed in integers (exact for b <= 30) before the cast, so 16-bit grids are exact.
    return (jnp.left_shift(jnp.ones_like(bits), bits) - 1).astype(dtype)


def _huge_scale_factor(scale: jax.Array) -> jax.Array:
    """``2^-64`` where ``scale > 2^64``, else 1: multiply both ``x`` and ``scale`` by it.

    Above ~8.5e37 (float32) the reciprocal ``1 / scale`` is subnormal, which XLA flushes to
    zero, quantizing everything to 0 (found by tests/test_quant_fuzz.py; XLA also turns a
    division by the broadcast scale into that reciprocal). Scaling by a power of two is exact,
    so ordinary scales (factor 1) give bit-identical results and huge ones a normal reciprocal.
    """
    return jnp.where(scale > 2.0**64, jnp.asarray(2.0**-64, scale.dtype), 1.0).astype(scale.dtype)


def _per_example_bits(bits: ArrayLike, batch: int) -> jax.Array:
    bits = jnp.asarray(bits)
    if not jnp.issubdtype(bits.dtype, jnp.integer):
        raise TypeError(f"bits must be an integer array, got dtype {bits.dtype}")
    if bits.ndim == 0:
        return jnp.broadcast_to(bits, (batch,))
    if bits.shape != (batch,):
        raise ValueError(f"bits must be a scalar or have shape [B]=({batch},), got {bits.shape}")
    return bits


def quantize_activation(x: ArrayLike, bits: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Integer codes, scales and zero points of the dynamic per-example activation quantizer.

    Args:
      x: float array ``[B, ...]``.
      bits: integer bit-widths ``[B]`` or a scalar (broadcast over the batch), in
        ``[MIN_BITS, MAX_BITS]``.

    Returns:
      ``(q, scale, zero_point)`` in float32 (or float64 for float64 input; 16-bit codes do not
      fit bfloat16): ``q`` has ``x``'s shape and holds integers in ``[0, 2^b - 1]``; ``scale``
      and ``zero_point`` are ``[B]``. For a degenerate example (all zeros, or a range below
      ~1e-38 whose reciprocal overflows) scale, zero point and ``q`` are 0.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("x must have a leading batch axis, got a scalar")
    bits = _per_example_bits(bits, x.shape[0])
    axes = tuple(range(1, x.ndim))
    # Accumulate the range in float32 at least: bf16/fp16 inputs keep their own output dtype.
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(compute_dtype)
    lo = jnp.minimum(jnp.min(xc, axis=axes), 0.0)
    hi = jnp.maximum(jnp.max(xc, axis=axes), 0.0)
    n = _num_levels_minus_one(bits, compute_dtype)
    scale = (hi - lo) / n
    # hi - lo overflows for ranges near the dtype's limit; hi/n - lo/n does not (n >= 3).
    scale = jnp.where(jnp.isfinite(scale), scale, hi / n - lo / n)
    c = _huge_scale_factor(scale)  # 1 unless the range is beyond ~1e19
    inv_scale = 1.0 / (scale * c)
    # Degenerate: an all-zero example (scale 0) or a range so tiny that 1/scale overflows.
    # Such examples pass through unchanged (see fake_quant_activation).
    degenerate = ~jnp.isfinite(inv_scale)
    scale = jnp.where(degenerate, 0.0, scale)
    inv_scale = jnp.where(degenerate, 0.0, inv_scale)
    # lo <= 0 <= hi guarantees 0 <= zero_point <= n, so zero is exactly representable.
    zero_point = jnp.round((-lo * c) * inv_scale)
    expand = (slice(None),) + (None,) * len(axes)
    xs = xc * c[expand]
    q = jnp.clip(jnp.round(xs * inv_scale[expand]) + zero_point[expand], 0.0, n[expand])
    return q, scale, zero_point


def fake_quant_activation(x: ArrayLike, bits: ArrayLike) -> jax.Array:
    """Dynamic per-example asymmetric fake quantization of activations, straight-through.

    Args:
      x: float array ``[B, ...]`` (float32, bfloat16 or float16).
      bits: integer bit-widths ``[B]`` (one per example) or a scalar, in
        ``[MIN_BITS, MAX_BITS]``; may be traced.

    Returns:
      ``x_hat`` with ``x``'s shape and dtype: at most ``2^b`` distinct values per example,
      ``x_hat == x`` for all-zero examples, finite for finite ``x``, gradient identity
      w.r.t. ``x``.

    References:
      PyTorch ``torch.fake_quantize_per_tensor_affine`` with ``quant_min=0``,
      ``quant_max=2^b - 1`` and a min/max observer, applied to each example separately.
    """
    x = jnp.asarray(x)
    q, scale, zero_point = quantize_activation(x, bits)
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    s, z = scale[expand], zero_point[expand]
    x_hat = s * (q - z)
    # The grid can reach half a step past the range; near the dtype's limit that would be inf.
    big = jnp.finfo(x.dtype).max
    x_hat = jnp.clip(x_hat, -big, big)
    # For ranges beyond ~1e19 (where _huge_scale_factor applies) keep values inside the range
    # itself: only there, so ordinary ranges stay bit-exact with PyTorch.
    axes = tuple(range(1, x.ndim))
    xc = x.astype(x_hat.dtype)
    huge = s > 2.0**64
    lo = jnp.minimum(jnp.min(xc, axis=axes), 0.0)[expand]
    hi = jnp.maximum(jnp.max(xc, axis=axes), 0.0)[expand]
    x_hat = jnp.where(huge, jnp.clip(x_hat, lo, hi), x_hat).astype(x.dtype)
    x_hat = jnp.where(s == 0, x, x_hat)  # degenerate example: identity
    return straight_through(x, x_hat)


def quantize_weight(
    w: ArrayLike, bits: ArrayLike, *, channel_axis: int | Sequence[int] = -1
) -> tuple[jax.Array, jax.Array]:
    """Integer codes and per-channel scales of the static symmetric weight quantizer.

    Args:
      w: float weights, e.g. a conv kernel ``[kh, kw, C_in, C_out]`` or a dense kernel
        ``[C_in, C_out]``.
      bits: integer bit-width scalar (Python int or array, may be traced), in
        ``[MIN_BITS, MAX_BITS]``.
      channel_axis: the output-channel axis, or several (e.g. the free axes of an einsum
        operand); the scale is computed over all other axes.

    Returns:
      ``(q, scale)`` in float32 (float64 for float64 ``w``): ``q`` has ``w``'s shape and holds
      integers in ``[-qmax, qmax]``, ``qmax = 2^(b-1) - 1``; ``scale`` has ``w``'s rank with size 1
      on the reduced axes. Degenerate channels (all zero, or a scale below the smallest normal
      float) get ``scale = 0`` and ``q = 0``.
    """
    w = jnp.asarray(w)
    bits = jnp.asarray(bits)
    if not jnp.issubdtype(bits.dtype, jnp.integer) or bits.ndim != 0:
        raise TypeError(f"weight bits must be an integer scalar, got {bits.dtype}{bits.shape}")
    channels = {channel_axis} if isinstance(channel_axis, int) else set(channel_axis)
    channels = {a % w.ndim for a in channels} if w.ndim else set()
    axes = tuple(a for a in range(w.ndim) if a not in channels)
    compute_dtype = jnp.promote_types(w.dtype, jnp.float32)
    wc = w.astype(compute_dtype)
    qmax = _num_levels_minus_one(bits - 1, compute_dtype)
    scale = jnp.max(jnp.abs(wc), axis=axes, keepdims=True) / qmax
    # Degenerate: an all-zero channel, or one so tiny that its scale is subnormal (flushed to
    # zero by XLA): passed through unchanged, like a degenerate activation example.
    normal = scale >= jnp.finfo(compute_dtype).tiny
    safe_scale = jnp.where(normal, scale, 1.0)
    c = _huge_scale_factor(safe_scale)
    q = jnp.clip(jnp.round((wc * c) * (1.0 / (safe_scale * c))), -qmax, qmax)
    return jnp.where(normal, q, 0.0), jnp.where(normal, scale, 0.0)


def fake_quant_weight(
    w: ArrayLike, bits: ArrayLike, *, channel_axis: int | Sequence[int] = -1
) -> jax.Array:
    """Static symmetric per-output-channel fake quantization of weights, straight-through.

    Args:
      w: float weights, e.g. a conv kernel ``[kh, kw, C_in, C_out]`` or a dense kernel
        ``[C_in, C_out]``.
      bits: integer bit-width (Python int or integer array scalar, may be traced), in
        ``[MIN_BITS, MAX_BITS]``.
      channel_axis: the output-channel axis (or axes); the scale is computed over all others.

    Returns:
      ``w_hat`` with ``w``'s shape and dtype on the grid ``s * {-qmax, ..., qmax}`` per
      channel with ``qmax = 2^(b-1) - 1``; all-zero channels (and channels whose scale is
      below the smallest normal float) come back unchanged; finite in, finite out.
    """
    w = jnp.asarray(w)
    q, scale = quantize_weight(w, bits, channel_axis=channel_axis)
    normal = scale > 0
    # s * qmax can round past the dtype's largest value; clip so finite stays finite.
    big = jnp.finfo(w.dtype).max
    w_hat = jnp.clip(jnp.where(normal, scale, 1.0) * q, -big, big).astype(w.dtype)
    w_hat = jnp.where(normal, w_hat, w)
    return straight_through(w, w_hat)
