"""The functional boundary: split a model once, then a pure forward pass of arrays.

Training and evaluation code does not call modules directly: split a
:class:`~ptq_adversary.models.QuantizedModel` once with :func:`split_model` and use the pure
:func:`apply_model`

    apply_model(graphdef, params, rest, x, bits=None, *, train=False, frozen_bn=False)

with ``x`` float32 ``[B, H, W, C]`` and ``bits`` int ``[B, num_sites]`` (site order = program
order) or ``None`` for full precision. It jits, differentiates (straight-through) and vmaps over
a leading policy axis of ``bits`` with ``x`` and the weights shared. :func:`batch_branches`
computes a per-example function as independent parts of its batch; :func:`count_params` counts
a state's parameters from shapes alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import backend
from ptq_adversary.models.quantized import QuantizedModel

__all__ = ["apply_model", "batch_branches", "count_params", "split_model"]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a model once at the boundary into pure pytrees.

    Returns:
      ``(graphdef, params, rest)``: the static structure, the ``nnx.Param`` state (what
      optimizers update) and everything else (BatchNorm statistics).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"split_model needs an nnx.Module, got {type(model).__name__}; a function (e.g. a "
            "linen module.apply) enters through models.as_quantized_model(fn, params=...)"
        )
    return nnx.split(model, nnx.Param, ...)


def apply_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x: ArrayLike,
    bits: ArrayLike | None = None,
    *,
    train: bool = False,
    frozen_bn: bool = False,
    branches: int | None = None,
    quant_mode: str = "fake",
) -> tuple[jax.Array, nnx.State]:
    """Pure forward pass of a split :class:`QuantizedModel`; jittable, differentiable, vmappable.

    Args:
      graphdef: from :func:`split_model`.
      params: parameter state from :func:`split_model` (or updated by an optimizer).
      rest: non-parameter state (BatchNorm statistics).
      x: float32 ``[B, H, W, C]`` images.
      bits: int ``[B, L]`` activation bit-widths (``L = model.num_sites``), or ``None`` for
        full precision (static choice). With ``bits`` the network runs through its transformed
        program (:mod:`ptq_adversary.transform`) in inference mode: BatchNorm on its running
        statistics, every site per example. To evaluate ``P`` policies at once, ``jax.vmap``
        this function over a ``[P, B, L]`` array with everything else shared
        (``in_axes=(None, None, None, None, 0)``).
      train: static; full precision with batch statistics (``net.train()``) unless
        ``frozen_bn``. With ``bits``, ``train`` requires ``frozen_bn`` (stage B).
      frozen_bn: static; with ``train``, keep BatchNorm on its running statistics (stage B).
      branches: static; split the batch into this many parts computed as independent
        branches of one program and concatenated. Every op of an inference pass is per
        example, so only the schedule changes: the logits equal the unsplit pass up to the
        float rounding of differently sized convolutions (tests/models/test_functional.py).
        ``None``: :func:`backend.inference_branches` for quantized inference (``bits`` given,
        ``train=False``), else 1 (full-precision passes are one fused kernel on XLA:CPU and
        gain nothing).
        Values above ``B`` are clipped to ``B``; a value > 1 with batch statistics
        (``train and not frozen_bn``) is an error.
      quant_mode: static; ``"fake"`` (fake quantization in float) or ``"integer"`` (every
        site on integer codes with int32 accumulation, see :class:`transform.QuantizedFn`).

    Returns:
      ``(logits, new_rest)``: float ``[B, num_classes]`` and the updated non-parameter state,
      which differs from ``rest`` only when ``train and not frozen_bn``.
    """
    if bits is not None and train and not frozen_bn:
        raise ValueError(
            "quantized passes run BatchNorm on its running statistics: bits with train=True "
            "need frozen_bn=True"
        )
    if branches is None:
        batch = jnp.shape(x)[0] if jnp.ndim(x) else 0
        branches = 1 if bits is None or train else backend.inference_branches(batch)
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if branches > 1 and train and not frozen_bn:
        raise ValueError(
            "branches > 1 needs per-example computation, but train=True without frozen_bn "
            "normalizes with batch statistics (which would differ per branch)"
        )
    flags = dict(train=train, frozen_bn=frozen_bn, quant_mode=quant_mode)
    if branches > 1:  # batch_branches clips to B; inference and frozen BN leave `rest` as is
        fn = lambda x, b: _apply(graphdef, params, rest, x, b, **flags)[0]
        return batch_branches(fn, branches, x, bits), rest
    return _apply(graphdef, params, rest, x, bits, **flags)


def batch_branches(fn: Callable[..., Any], branches: int, *args: Any) -> Any:
    """``fn(*args)`` computed as ``branches`` independent parts of the leading axis.

    Every array leaf of ``args`` (pytrees; ``None`` passes through) is cut along axis 0 with
    ``jnp.array_split``; ``fn`` runs once per part, unrolled into the traced program, and every
    leaf of its pytree output is concatenated back along axis 0. Correct only for ``fn`` that
    treats examples independently (inference, frozen BatchNorm); see :func:`apply_model`.

    Args:
      fn: ``(*parts) -> pytree`` of arrays with the parts' leading axis.
      branches: number of parts, clipped to ``[1, B]``.
      *args: pytrees of arrays ``[B, ...]`` sharing ``B``, or ``None``.

    Returns:
      ``fn``'s pytree over all ``B`` examples.
    """
    args = jax.tree.map(jnp.asarray, args)
    batch = jax.tree.leaves(args)[0].shape[0]
    branches = max(1, min(branches, batch))
    if branches == 1:
        return fn(*args)
    pieces = jax.tree.map(lambda a: jnp.array_split(a, branches), args)
    is_pieces = lambda v: isinstance(v, list) and all(isinstance(p, jax.Array) for p in v)
    part = lambda i: jax.tree.map(lambda p: p[i], pieces, is_leaf=is_pieces)
    outs = [fn(*part(i)) for i in range(branches)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def _apply(graphdef, params, rest, x, bits, *, train, frozen_bn, quant_mode):
    # copy=True: fresh Variables in the current trace, so BatchNorm updates neither touch the
    # caller's `rest` (purity) nor trip NNX's trace-level check under jax.grad inside jax.jit.
    model = nnx.merge(graphdef, params, rest, copy=True)
    if not isinstance(model, QuantizedModel):
        raise TypeError(
            f"apply_model needs a split QuantizedModel, got {type(model).__name__}; wrap a "
            "network with models.as_quantized_model(net, input_shape=...)"
        )
    x = jnp.asarray(x)
    if bits is None:
        if train and not frozen_bn:
            model.net.train()
        else:
            model.net.eval()
        logits = model.net(x)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return logits, new_rest
    qfn, state = model.program(x.shape[1:])
    return qfn(state, x, bits, mode=quant_mode), rest


def count_params(params: nnx.State) -> int:
    """Total number of scalar parameters in a parameter state (or any pytree of arrays).

    Reads shapes only, so it also counts abstract states, e.g. from
    ``split_model(nnx.eval_shape(lambda: create_model(...)))``, without initializing anything.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
