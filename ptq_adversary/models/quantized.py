"""The quantized-model wrapper: a network plus its dynamic-PTQ settings, and its program.

:class:`QuantizedModel` pairs an ``nnx.Module`` ``net(x) -> logits`` with what the program
transformation (:mod:`ptq_adversary.transform`) needs: the per-example input shape and the
weight bit-width. Its ``num_sites``, ``site_names`` and ``sites`` are derived from the network's
traced program in inference mode, which :func:`quantized_fn` caches by graph structure and
shapes (:func:`quantize_cache_info`, :func:`clear_quantize_cache`). Any function
``fn(params, x)`` (a linen ``module.apply``, plain JAX) enters as a :class:`FunctionNet`
(:func:`as_quantized_model`); :func:`check_program` derives the sites on real data and checks
that they matter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import transform

__all__ = [
    "FunctionNet",
    "QuantizedModel",
    "as_quantized_model",
    "check_program",
    "clear_quantize_cache",
    "quantize_cache_info",
    "quantized_fn",
    "quantized_program",
]


class FunctionNet(nnx.Module):
    """Any ``fn(params, x) -> logits`` with its parameter pytree, as an ``nnx.Module``.

    The pytree's arrays become ``nnx.Param`` s (a linen ``variables`` dict, batch statistics
    included), so a function enters everything that takes a module: the audit, the analyses,
    the policy training against a frozen network. ``fn`` must be in inference mode
    (e.g. ``functools.partial(module.apply, train=False)``); it is part of the static graph and
    must be hashable (functions and bound methods are).
    """

    def __init__(self, fn: Callable[[Any, jax.Array], Any], params: Any):
        """Wraps ``fn``.

        Args:
          fn: ``fn(params, x [B, ...]) -> [B, C]``.
          params: the pytree of arrays ``fn`` takes (e.g. linen ``variables``).
        """
        if params is None:
            raise TypeError(
                "params is None: a function needs its parameters, e.g. "
                "audit(module.apply, images, labels, params=variables) for a flax.linen module"
            )
        self.fn = fn
        self.variables = nnx.data(jax.tree.map(lambda a: nnx.Param(jnp.asarray(a)), params))

    def __call__(self, x: ArrayLike) -> Any:
        """``fn(params, x)``."""
        is_var = lambda v: isinstance(v, nnx.Variable)
        return self.fn(jax.tree.map(lambda v: v[...], self.variables, is_leaf=is_var), x)


class QuantizedModel(nnx.Module):
    """A network plus the settings of its dynamic-PTQ program.

    Attributes:
      net: any ``nnx.Module`` ``net(x) -> logits``, BatchNorm switched by ``.train()`` /
        ``.eval()``.
      input_shape: per-example input shape, e.g. ``(28, 28, 1)``; fixes the program whose
        sites ``num_sites`` / ``site_names`` / ``sites`` describe.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      quantize_first: whether the layer that reads the image is a site too.
    """

    def __init__(
        self,
        net: nnx.Module,
        *,
        input_shape: Sequence[int],
        weight_bits: int | None = 8,
        quantize_first: bool = False,
    ):
        """Wraps ``net``; arguments as the attributes."""
        self.net = net
        self.input_shape = tuple(int(d) for d in input_shape)
        self.weight_bits = None if weight_bits is None else int(weight_bits)
        self.quantize_first = bool(quantize_first)

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Full precision, in whatever mode ``net`` is (see ``models.apply_model``)."""
        return self.net(x)

    def program(
        self, x_shape: Sequence[int] | None = None
    ) -> tuple[transform.QuantizedFn, nnx.State]:
        """``net``'s transformed program in inference mode (cached; shapes only) and its state.

        Args:
          x_shape: per-example input shape (default ``input_shape``).

        Returns:
          ``(qfn, state)``: call ``qfn(state, x, bits)`` or ``qfn.run_segments(state, ...)``.
        """
        graphdef, state = _eval_split(self.net)
        return quantized_fn(graphdef, state, self, x_shape), state

    def quantized_fn(self) -> transform.QuantizedFn:
        """The transformed program of ``net`` in inference mode at ``input_shape``."""
        return self.program()[0]

    @property
    def num_sites(self) -> int:
        """``L``, derived from the program."""
        return self.quantized_fn().num_sites

    @property
    def site_names(self) -> tuple[str, ...]:
        """Site names in ``bits`` column order."""
        return self.quantized_fn().site_names

    @property
    def sites(self) -> tuple[transform.Site, ...]:
        """Per-site descriptions (op, shapes, share of FLOPs)."""
        return self.quantized_fn().sites


def as_quantized_model(
    model: Any,
    *,
    input_shape: Sequence[int],
    params: Any = None,
    weight_bits: int | None = 8,
    quantize_first: bool = False,
) -> QuantizedModel:
    """Any model a user brings, as a :class:`QuantizedModel`.

    Args:
      model: a :class:`QuantizedModel` (returned as is), an ``nnx.Module``, or a function
        ``fn(params, x)`` (a linen ``module.apply``, plain JAX) given with ``params``.
      input_shape: per-example input shape.
      params: the function's parameter pytree (linen ``variables``); only with a function.
      weight_bits, quantize_first: the transform's settings.

    Raises:
      TypeError: a function without ``params``, ``params`` with a module, or anything else.
    """
    if isinstance(model, QuantizedModel):
        return model
    if isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError("params= goes with a function; an nnx.Module carries its own state")
        net = model
    elif callable(model):
        if params is None:
            raise TypeError(
                "a function model needs its parameters: pass params=, e.g. "
                "audit(module.apply, images, labels, params=variables) for a flax.linen module"
            )
        net = FunctionNet(model, params)
    else:
        raise TypeError(f"model must be an nnx.Module or a function, got {type(model).__name__}")
    return QuantizedModel(
        net, input_shape=input_shape, weight_bits=weight_bits, quantize_first=quantize_first
    )


def check_program(model: QuantizedModel, example_input: ArrayLike) -> transform.QuantizedFn:
    """Derives ``model``'s sites on real data and checks that they matter.

    Runs :func:`transform.quantize` with the concrete weights (so it verifies that the network
    treats examples independently in inference mode), then evaluates ``example_input`` at the
    lowest and highest bit-width of every site.

    Args:
      model: the model to check.
      example_input: float ``[B, ...]`` (a few examples suffice).

    Returns:
      The transformed program.

    Raises:
      transform.TransformError: no site, a site inside a loop, a network that mixes examples,
        or quantized logits that do not depend on the bits at all.
    """
    x = jnp.asarray(example_input, jnp.float32)[:8]
    eval_graphdef, state = _eval_split(model.net)
    qfn = transform.quantize(
        functools.partial(_call_net, eval_graphdef),
        state,
        x,
        weight_bits=model.weight_bits,
        quantize_first=model.quantize_first,
    )
    low = jnp.full((x.shape[0], qfn.num_sites), 2, jnp.int32)
    high = jnp.full((x.shape[0], qfn.num_sites), 16, jnp.int32)
    run = jax.jit(qfn)
    if np.array_equal(np.asarray(run(state, x, low)), np.asarray(run(state, x, high))):
        raise transform.TransformError(
            f"the quantized output does not depend on the bits: {qfn.num_sites} site(s) "
            f"({', '.join(qfn.site_names)}) give the same logits at 2 and 16 bits on "
            f"{x.shape[0]} examples, so every allocation would look harmless"
        )
    return qfn


def _eval_split(net: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``net``'s structure in inference mode and its whole state (no copy of the arrays)."""
    graphdef, state = nnx.split(net)
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return nnx.split(copy)


def _avals(tree: Any) -> tuple[Any, tuple[tuple[tuple[int, ...], str], ...]]:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(jnp.shape(a)), str(jnp.result_type(a))) for a in leaves)


def quantized_fn(
    eval_graphdef: nnx.GraphDef, state: nnx.State, model: QuantizedModel, x_shape=None
) -> transform.QuantizedFn:
    """The transformed program of a network in inference mode, cached by structure and shapes.

    Args:
      eval_graphdef, state: ``nnx.split`` of the network in inference mode (arrays or tracers).
      model: the :class:`QuantizedModel` whose settings apply.
      x_shape: per-example input shape (default ``model.input_shape``).
    """
    treedef, shapes = _avals(state)
    x_shape = tuple(model.input_shape if x_shape is None else x_shape)
    return _cached_quantize(
        eval_graphdef, treedef, shapes, x_shape, model.weight_bits, model.quantize_first
    )


@functools.lru_cache(maxsize=64)
def _cached_quantize(graphdef, treedef, shapes, x_shape, weight_bits, quantize_first):
    abstract = jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in shapes]
    )
    fn = functools.partial(_call_net, graphdef)
    example = jax.ShapeDtypeStruct((1, *x_shape), jnp.float32)
    return transform.quantize(
        fn, abstract, example, weight_bits=weight_bits, quantize_first=quantize_first
    )


def quantize_cache_info() -> tuple[int, int, int | None, int]:
    """Statistics of :func:`quantized_fn`'s cache of transformed programs.

    Returns:
      ``functools``' cache-info named tuple ``(hits, misses, maxsize, currsize)``: one entry per
      (graph structure, state shapes, input shape, ``weight_bits``, ``quantize_first``).
    """
    return _cached_quantize.cache_info()


def clear_quantize_cache() -> None:
    """Empties :func:`quantized_fn`'s cache, so the next call traces and transforms again.

    For timing the transformation itself (``experiments/bench_transform.py`` counts it in the
    compile time) and for tests; ``jax.clear_caches()`` does not reach this cache.
    """
    _cached_quantize.cache_clear()


def quantized_program(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x_shape: Sequence[int] | None = None
) -> tuple[transform.QuantizedFn, nnx.State]:
    """The transformed program of a split :class:`QuantizedModel` and the state it takes.

    Args:
      graphdef, params, rest: from :func:`~ptq_adversary.models.split_model` (arrays or tracers).
      x_shape: per-example input shape (default: the model's ``input_shape``).

    Returns:
      ``(qfn, state)``: call ``qfn(state, x, bits)`` or ``qfn.run_segments(state, ...)``.
    """
    return nnx.merge(graphdef, params, rest).program(x_shape)


def _call_net(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)
