"""Step builders: where models, losses, quantizers and optimizers meet.

Each ``make_*`` takes already-built pieces (a model's graphdef, an optax optimizer) and the few
scalars it needs, and returns a pure function of arrays that the trainer jits. No config, no
I/O. Steps return flat dicts of scalar (or ``[P]``) arrays; the caller reduces and logs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.typing import ArrayLike

from ptq_adversary.models import apply_model

__all__ = [
    "TrainState",
    "create_train_state",
    "make_supervised_train_step",
    "make_eval_step",
    "uniform_bits",
]


@struct.dataclass
class TrainState:
    """Everything a supervised run needs to continue exactly; a pytree of arrays.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's ``nnx.Param`` state.
      rest: the model's other state (BatchNorm statistics).
      opt_state: the optax optimizer state.
      rng: uint32 ``[2]`` base key; steps derive theirs with ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def create_train_state(
    params: nnx.State, rest: nnx.State, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """The initial state: step 0, fresh optimizer state, base key from ``seed``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def make_supervised_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A full-precision cross-entropy training step (BatchNorm in training mode).

    Args:
      graphdef: the model's graph definition (from ``split_model``).
      optimizer: an optax optimizer.
      label_smoothing: in ``[0, 1)``; 0 is plain cross-entropy.

    Returns:
      ``step(state, images [B,H,W,C] float32, labels [B] int32) -> (state, metrics)`` with
      batch-mean ``loss`` and ``accuracy`` and the global ``grad_norm``.
    """

    def loss_fn(params, rest, images, labels):
        logits, new_rest = apply_model(graphdef, params, rest, images, train=True)
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, new_rest)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_rest)), grads = grad_fn(state.params, state.rest, images, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, rest=new_rest, opt_state=opt_state
        )
        return new_state, metrics

    return step


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
    graphdef: nnx.GraphDef,
) -> Callable[..., dict[str, jax.Array]]:
    """An evaluation step: full precision and P bit allocations in one call, masked sums.

    The P quantized forward passes run as one ``jax.vmap`` over the policy axis of ``bits`` with
    shared weights, so one compile serves every allocation of the same shape.

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
            q_logits, _ = apply_model(graphdef, params, rest, images, bits_bl)
            return masked_sums(q_logits, labels, mask)

        q_correct, q_loss = jax.vmap(quantized)(jnp.asarray(bits))
        return {
            "count": jnp.sum(mask),
            "fp_correct": fp_correct,
            "fp_loss": fp_loss,
            "q_correct": q_correct,
            "q_loss": q_loss,
        }

    return step
