"""Many bit allocations at once: the chunked policy map and the evaluation step built on it.

:func:`map_policies` runs a function of one allocation ``bits [B, L]`` over a leading policy
axis ``[P, B, L]`` with everything else shared, in chunks sized for the backend;
:func:`make_eval_step` evaluates full precision and ``P`` allocations in one call;
:func:`uniform_bits` builds the every-site-the-same allocations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import backend
from ptq_adversary.models import apply_model

__all__ = ["make_eval_step", "map_policies", "uniform_bits"]


def map_policies(
    fn: Callable[[jax.Array], Any],
    bits_pbl: ArrayLike,
    *,
    chunk: int | None = None,
    unroll: bool = False,
) -> Any:
    """``jax.vmap(fn)(bits_pbl)``, computed in chunks of ``chunk`` policies.

    ``fn`` maps one allocation ``bits_bl [B, L]`` to a pytree of arrays; everything else it
    needs (weights, images) is closed over and shared by all policies, and whatever does not
    depend on the bits (e.g. the first layer, whose input is the image) is computed once. With
    ``chunk >= P`` this is one ``jax.vmap`` (the P policies folded into the batch). Otherwise
    it is a ``jax.lax.map(fn, bits_pbl, batch_size=chunk)``: a loop over ``P // chunk``
    vmapped chunks plus one vmapped remainder, so each call keeps a cache-friendly size and
    memory stays flat in ``P``; or, with ``unroll``, the same chunks as a Python loop (one copy
    of ``fn`` per chunk in the program).

    Use ``unroll=True`` where the result is differentiated: XLA:CPU (jax 0.10) leaves the
    weight-gradient convolutions of a loop body in a non-canonical layout, and the backward pass
    of the looped policies runs several times slower than one vmap (measurements:
    docs/PERFORMANCE.md). Forward-only evaluation keeps the loop, whose program size and compile
    time do not grow with P.

    Args:
      fn: ``bits_bl int [B, L] -> pytree``, traceable.
      bits_pbl: int ``[P, B, L]`` (any leading axis ``P``, including 0).
      chunk: policies per vmapped call; ``None`` picks :func:`backend.policy_chunk` for the
        current backend.
      unroll: chunks as a Python loop instead of a ``lax.map``.

    Returns:
      ``fn``'s pytree with a leading ``[P]`` axis on every leaf; equal to the full vmap up to
      float rounding of differently sized convolutions (tests/steps/test_policies.py).
    """
    bits_pbl = jnp.asarray(bits_pbl)
    num_policies = bits_pbl.shape[0]
    if chunk is None:
        chunk = backend.policy_chunk(num_policies, bits_pbl.shape[1] if bits_pbl.ndim > 1 else 1)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if chunk >= num_policies:
        return jax.vmap(fn)(bits_pbl)
    if not unroll:
        return jax.lax.map(fn, bits_pbl, batch_size=chunk)
    parts = [jax.vmap(fn)(bits_pbl[i : i + chunk]) for i in range(0, num_policies, chunk)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def uniform_bits(choices: Sequence[int], batch: int, num_sites: int) -> jax.Array:
    """Allocations that put every site at the same bit-width.

    Args:
      choices: P bit-widths.
      batch: B.
      num_sites: L.

    Returns:
      int32 ``[P, B, L]`` with ``out[p] == choices[p]`` everywhere.
    """
    values = jnp.asarray(choices, jnp.int32)[:, None, None]
    return jnp.broadcast_to(values, (len(choices), batch, num_sites))


def make_eval_step(
    graphdef: nnx.GraphDef, *, chunk: int | None = None, branches: int | None = None
) -> Callable[..., dict[str, jax.Array]]:
    """An evaluation step: full precision and P bit allocations in one call, masked sums.

    The P quantized forward passes run over the policy axis of ``bits`` with shared weights
    (:func:`map_policies`: vmapped, in chunks of ``chunk`` policies), so one compile serves
    every allocation of the same shape.

    Args:
      graphdef: the model's graph definition.
      chunk: policies per vmapped call (``None``: :func:`backend.policy_chunk` for the backend).
      branches: batch branches of each quantized pass (``None``: the backend's default,
        :func:`backend.inference_branches`; see :func:`models.apply_model`).

    Returns:
      ``step(params, rest, images [B,H,W,C], labels [B], mask [B], bits [P,B,L] int) ->
      metrics`` with masked sums: ``count``, ``fp_correct``, ``fp_loss`` (scalars) and
      ``q_correct``, ``q_loss`` (``[P]``). ``P`` may be 0.
    """

    def masked_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array):
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(correct * mask), jnp.sum(loss * mask)

    def step(
        params, rest, images: ArrayLike, labels: ArrayLike, mask: ArrayLike, bits: ArrayLike
    ) -> dict[str, Any]:
        fp_logits, _ = apply_model(graphdef, params, rest, images)
        fp_correct, fp_loss = masked_sums(fp_logits, labels, mask)

        def quantized(bits_bl):
            q_logits, _ = apply_model(graphdef, params, rest, images, bits_bl, branches=branches)
            return masked_sums(q_logits, labels, mask)

        q_correct, q_loss = map_policies(quantized, bits, chunk=chunk)
        return {
            "count": jnp.sum(mask),
            "fp_correct": fp_correct,
            "fp_loss": fp_loss,
            "q_correct": q_correct,
            "q_loss": q_loss,
        }

    return step
