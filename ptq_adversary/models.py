"""Model registry, the quantized-model wrapper and the functional boundary.

The zoo (:mod:`ptq_adversary.zoo`) and users' own networks are ordinary ``flax.nnx`` modules,
``net(x) -> logits [B, C]`` with BatchNorm switched by ``net.train()`` / ``net.eval()``; none of
them knows about bit-widths. :class:`QuantizedModel` pairs such a network with what the
program transformation (:mod:`ptq_adversary.transform`) needs: the per-example input shape and
the weight bit-width. Its ``num_sites``, ``site_names`` and ``sites`` are derived from the
network's traced program.

Training and evaluation code does not call modules directly: split a :class:`QuantizedModel`
once with :func:`split_model` and use the pure :func:`apply_model`

    apply_model(graphdef, params, rest, x, bits=None, *, train=False, frozen_bn=False)

with ``x`` float32 ``[B, H, W, C]`` and ``bits`` int ``[B, num_sites]`` (site order = program
order) or ``None`` for full precision. It jits, differentiates (straight-through) and vmaps over
a leading policy axis of ``bits`` with ``x`` and the weights shared. Any function
``fn(params, x)`` (a linen ``module.apply``, plain JAX) enters as a :class:`FunctionNet`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import backend, transform, zoo

__all__ = [
    "MODELS",
    "FunctionNet",
    "QuantizedModel",
    "apply_model",
    "as_quantized_model",
    "batch_branches",
    "check_program",
    "count_params",
    "create_model",
    "load_factory",
    "quantized_fn",
    "quantized_program",
    "split_model",
]

#: The built-in architectures (see :mod:`ptq_adversary.zoo`).
MODELS: dict[str, Callable[..., nnx.Module]] = dict(zoo.ZOO)


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
        """Full precision, in whatever mode ``net`` is (see :func:`apply_model`)."""
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


def load_factory(path: str) -> Callable[..., nnx.Module]:
    """Imports a user's model constructor from ``"package.module:function"``.

    Raises:
      ValueError: a malformed path, a module that does not import, or a missing function.
    """
    import importlib  # noqa: PLC0415 (only for user models)

    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model factory must look like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model factory {path!r}: cannot import {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model factory {path!r}: {module_name} has no function {attr!r}")
    return fn


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int] = 32,
    weight_bits: int | None = 8,
    rngs: nnx.Rngs,
    **kwargs,
) -> QuantizedModel:
    """Builds a registered model.

    Args:
      name: a key of :data:`MODELS`.
      num_classes: number of logits.
      in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
      image_size: ``H`` (square) or ``(H, W)`` of the inputs the sites are described for.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **kwargs: architecture arguments of the constructor (e.g. ``widths``, ``width``).

    Returns:
      The network wrapped in a :class:`QuantizedModel`, in inference mode (``model(x)`` uses
      the running statistics; :func:`apply_model` switches modes itself).

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    net = MODELS[name](num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
    net.eval()  # a direct call is inference; apply_model sets the mode it is asked for
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return QuantizedModel(net, input_shape=(h, w, in_channels), weight_bits=weight_bits)


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


def quantized_program(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x_shape: Sequence[int] | None = None
) -> tuple[transform.QuantizedFn, nnx.State]:
    """The transformed program of a split :class:`QuantizedModel` and the state it takes.

    Args:
      graphdef, params, rest: from :func:`split_model` (arrays or tracers).
      x_shape: per-example input shape (default: the model's ``input_shape``).

    Returns:
      ``(qfn, state)``: call ``qfn(state, x, bits)`` or ``qfn.run_segments(state, ...)``.
    """
    return nnx.merge(graphdef, params, rest).program(x_shape)


def _call_net(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)


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
        float rounding of differently sized convolutions (tests/test_models.py). ``None``:
        :func:`backend.inference_branches` for quantized inference (``bits`` given,
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
