"""``quantize(fn, params, example_input)``: derives the sites from ``fn``'s program.

Checks the arguments, traces ``fn`` for one example (``x[:1]``,
:func:`~ptq_adversary.transform.tracing.flatten`), refuses a program without a live site, cuts
it into segments (:func:`~ptq_adversary.transform.program.make_program`), builds the site table
(:func:`~ptq_adversary.transform.sites.make_sites`) and, given concrete arrays, checks that the
per-example program computes what ``fn`` computes on a batch
(:func:`~ptq_adversary.transform.function.check_per_example`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ptq_adversary import quant
from ptq_adversary.transform.errors import TransformError
from ptq_adversary.transform.function import QuantizedFn, check_per_example
from ptq_adversary.transform.program import ActivationProducts, make_program
from ptq_adversary.transform.sites import make_sites
from ptq_adversary.transform.tracing import flatten

__all__ = ["quantize"]


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
      activation_products: what a conv/dot of two activations is (package docstring).
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
    builder, ops, param_ids, x_id, out_refs, out_tree, dead = flatten(
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
    program = make_program(builder, ops, param_ids, x_id, out_refs, site_ops, weight_bits)
    sites = make_sites(builder, ops, site_ops, param_ids, leaves_with_path)
    qfn = QuantizedFn(fn, program, sites, treedef, avals, x_aval, out_tree, options)
    if (
        check
        and not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        and not isinstance(x, jax.ShapeDtypeStruct)
    ):
        check_per_example(qfn, params, jnp.asarray(x))
    return qfn
