"""Full-precision training steps: the supervised (cross-entropy) and the distillation step.

Each ``make_*`` takes a model's graphdef and an optax optimizer and returns a pure
``step(state, images, labels, ...) -> (state, metrics)`` that the trainer jits, with BatchNorm
in training mode. :class:`TrainState` is the pytree those steps carry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ptq_adversary import losses
from ptq_adversary.models import apply_model

__all__ = [
    "TrainState",
    "create_train_state",
    "make_distill_train_step",
    "make_supervised_train_step",
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


def make_distill_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    temperature: float,
    label_weight: float = 0.0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A stage-A knowledge-distillation step from cached teacher logits (full precision).

    Loss: ``mean_b kd_loss(f(x_b), T_b; tau) + label_weight * mean_b CE(f(x_b), y_b)``.

    Args:
      graphdef: the student's graph definition.
      optimizer: an optax optimizer.
      temperature: KD temperature ``tau``.
      label_weight: weight of the optional cross-entropy term on the labels (0: black-box KD
        from the teacher's outputs only).

    Returns:
      ``step(state, images [B,H,W,C], labels [B], teacher_logits [B,C]) -> (state, metrics)``
      with ``loss``, ``kd_loss``, ``accuracy`` (vs labels), ``teacher_agreement`` and
      ``grad_norm``.
    """

    def loss_fn(params, rest, images, labels, teacher_logits):
        logits, new_rest = apply_model(graphdef, params, rest, images, train=True)
        kd = losses.kd_loss(logits, teacher_logits, temperature=temperature).mean()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return kd + label_weight * ce, (logits, new_rest, kd)

    def step(state: TrainState, images, labels, teacher_logits):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_rest, kd)), grads = grad_fn(
            state.params, state.rest, images, labels, teacher_logits
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        predictions = jnp.argmax(logits, -1)
        metrics = {
            "loss": loss,
            "kd_loss": kd,
            "accuracy": jnp.mean(predictions == labels),
            "teacher_agreement": jnp.mean(predictions == jnp.argmax(teacher_logits, -1)),
            "grad_norm": optax.tree.norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            rest=new_rest,
            opt_state=opt_state,
        )
        return new_state, metrics

    return step
