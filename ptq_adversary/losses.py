"""Losses and the policy-gradient objective: pure JAX/optax, per-example values.

Every function returns per-example values (a scalar for one example, or ``[...]`` for leading
axes where stated) and leaves the reduction over the batch to the caller (optax's convention).
Divergences reuse :mod:`optax.losses`; nothing here stops gradients the caller did not ask
for: wrap a target in ``jax.lax.stop_gradient`` where it must not be trained (e.g. the
full-precision logits in the robust stage-B term).

Divergences use ``optax.losses.kl_divergence_with_log_targets(log_predictions, log_targets)``
(``sum exp(log_t) * (log_t - log_p)`` = KL(target || prediction)) rather than
``kl_divergence(log_predictions, targets)``: same value, but the target stays in log space, so
a target probability that underflows to 0 never produces ``0 * log 0`` or a NaN gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

__all__ = [
    "kd_loss",
    "kl_divergence_logits",
    "margin_loss",
    "reinforce_loss",
]


def kl_divergence_logits(p_logits: ArrayLike, q_logits: ArrayLike) -> jax.Array:
    """``KL(softmax(p_logits) || softmax(q_logits))`` over the last axis.

    Used for the reward: the divergence of the quantized prediction ``q`` from the
    full-precision one ``p``.

    Args:
      p_logits: float ``[..., C]``, the reference (e.g. full-precision) logits.
      q_logits: float ``[..., C]``, the approximating (e.g. quantized) logits.

    Returns:
      float ``[...]`` (a scalar for ``[C]`` inputs), ``>= 0`` up to rounding.
    """
    return optax.losses.kl_divergence_with_log_targets(
        log_predictions=jax.nn.log_softmax(q_logits, axis=-1),
        log_targets=jax.nn.log_softmax(p_logits, axis=-1),
    )


def kd_loss(
    student_logits: ArrayLike, teacher_logits: ArrayLike, *, temperature: float = 4.0
) -> jax.Array:
    """Knowledge-distillation loss ``tau^2 * KL(softmax(T / tau) || softmax(S / tau))``.

    The ``tau^2`` factor keeps the gradient magnitude w.r.t. the student logits roughly
    independent of ``tau`` (Hinton et al.).

    Args:
      student_logits: float ``[..., C]``, ``S``.
      teacher_logits: float ``[..., C]``, ``T`` (not stop-gradiented here).
      temperature: ``tau > 0``.

    Returns:
      float ``[...]`` (a scalar for ``[C]`` inputs).

    References:
      Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    return temperature**2 * kl_divergence_logits(
        teacher_logits / temperature, student_logits / temperature
    )


def margin_loss(q_logits: ArrayLike, target_label: ArrayLike, *, margin: float = 5.0) -> jax.Array:
    """Detrimental objective ``(CE(q_logits, y) - margin)^2``: push the cross-entropy to ``margin``.

    Minimising it drives the quantized prediction's loss up towards ``margin`` (and no further,
    unlike maximising the CE, which is unbounded).

    Args:
      q_logits: float ``[..., C]``, the quantized model's logits.
      target_label: int ``[...]``, the label ``y`` (the teacher's, in stage B).
      margin: the target cross-entropy ``m`` in nats.

    Returns:
      float ``[...]`` (a scalar for ``[C]`` logits and a scalar label).

    References:
      Hong, Panaitescu-Liess, Kaya, Dumitras, "Qu-ANTI-zation: Exploiting Quantization Artifacts
      for Achieving Adversarial Outcomes", NeurIPS 2021.
    """
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(q_logits, target_label)
    return (ce - margin) ** 2


def reinforce_loss(
    log_probs: ArrayLike,
    rewards: ArrayLike,
    entropies: ArrayLike,
    *,
    entropy_coef: float | ArrayLike,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE with a leave-one-out baseline and an entropy bonus, for one input.

    With ``P`` allocations ``b_p`` sampled for the same input::

        baseline_p  = (sum_q r_q - r_p) / (P - 1)
        advantage_p = stop_gradient(r_p - baseline_p)
        loss = -mean_p(advantage_p * log_probs_p) - entropy_coef * mean_p(entropies_p)

    The baseline of each sample uses only the other samples, so the estimator stays unbiased
    (``P / (P - 1)`` times the one with the batch mean as baseline). Rewards are not normalised;
    scale them in the caller if needed. Vmap over the batch and average the loss there.

    Args:
      log_probs: float ``[P]``, ``log pi(b_p | x)`` (differentiable w.r.t. the policy).
      rewards: float ``[P]``, ``r_p`` (no gradient flows into them).
      entropies: float ``[P]``, the entropy bonus per sample (e.g. :func:`policy.entropy` along
        each sampled path).
      entropy_coef: weight of the entropy bonus, ``>= 0`` (may be traced).

    Returns:
      ``(loss, aux)``: float scalar ``loss`` and ``aux = {"advantages": [P], "baseline": [P]}``.

    Raises:
      ValueError: at trace time if ``P < 2`` or the shapes differ.

    References:
      Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist
      Reinforcement Learning", Machine Learning 1992.
      Kool, van Hoof, Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", ICLR 2019
      Deep RL Meets Structured Prediction workshop.
    """
    log_probs = jnp.asarray(log_probs)
    rewards = jnp.asarray(rewards)
    entropies = jnp.asarray(entropies)
    if log_probs.ndim != 1 or log_probs.shape != rewards.shape or rewards.shape != entropies.shape:
        raise ValueError(
            "log_probs, rewards and entropies must all have shape [P] for one input (vmap over "
            f"the batch), got {log_probs.shape}, {rewards.shape}, {entropies.shape}"
        )
    num_samples = log_probs.shape[0]
    if num_samples < 2:
        raise ValueError(
            f"the leave-one-out baseline needs P >= 2 samples per input, got P={num_samples}"
        )
    rewards = jax.lax.stop_gradient(rewards)
    baseline = (jnp.sum(rewards) - rewards) / (num_samples - 1)
    advantages = jax.lax.stop_gradient(rewards - baseline)
    loss = -jnp.mean(advantages * log_probs) - entropy_coef * jnp.mean(entropies)
    return loss, {"advantages": advantages, "baseline": baseline}
