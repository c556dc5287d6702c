"""Losses and the REINFORCE objective (ptq_adversary.losses), under jax.jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import losses

kd = jax.jit(losses.kd_loss, static_argnames="temperature")
kl = jax.jit(losses.kl_divergence_logits)
margin = jax.jit(losses.margin_loss, static_argnames="margin")


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


# ------------------------------------------------------------------------------------- KD
def test_kd_is_zero_for_identical_logits():
    logits = jnp.asarray([[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(kd(logits, logits), [0.0, 0.0], atol=1e-6)
    # ... and for logits that differ by a constant (same softmax).
    np.testing.assert_allclose(kd(logits + 7.0, logits), [0.0, 0.0], atol=1e-5)


def test_kd_by_hand():
    student, teacher, tau = [0.0, 4.0, -4.0], [8.0, 0.0, 4.0], 4.0
    # softmax(T / 4) = softmax([2, 0, 1]); softmax(S / 4) = softmax([0, 1, -1]).
    expected = tau**2 * _kl(_softmax([2.0, 0.0, 1.0]), _softmax([0.0, 1.0, -1.0]))
    np.testing.assert_allclose(kd(jnp.asarray(student), jnp.asarray(teacher)), expected, rtol=1e-5)
    assert expected > 0.0
    # Direction: KL(teacher || student), not the reverse.
    reverse = tau**2 * _kl(_softmax([0.0, 1.0, -1.0]), _softmax([2.0, 0.0, 1.0]))
    assert abs(expected - reverse) > 1e-3


def test_kd_scales_with_tau_squared():
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    base = kd(student, teacher, temperature=1.0)
    for tau in (2.0, 4.0):
        # Scaling the logits by tau undoes the temperature, leaving only the tau^2 factor.
        scaled = kd(tau * student, tau * teacher, temperature=tau)
        np.testing.assert_allclose(scaled, tau**2 * base, rtol=1e-5)


def test_kd_leading_axes_and_finite_gradients_for_saturated_teachers():
    rng = np.random.default_rng(1)
    student = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    teacher = student.at[..., 0].add(1e4)  # teacher softmax underflows to exact zeros
    assert kd(student, teacher).shape == (2, 3)
    for argnum in (0, 1):
        g = jax.jit(jax.grad(lambda s, t: jnp.sum(losses.kd_loss(s, t)), argnums=argnum))(
            student, teacher
        )
        assert np.all(np.isfinite(g))


def test_kl_divergence_logits_by_hand():
    p, q = [1.0, 0.0, -1.0], [0.0, 0.5, 0.0]
    np.testing.assert_allclose(
        kl(jnp.asarray(p), jnp.asarray(q)), _kl(_softmax(p), _softmax(q)), rtol=1e-5
    )
    np.testing.assert_allclose(kl(jnp.asarray(p), jnp.asarray(p)), 0.0, atol=1e-7)


# --------------------------------------------------------------------------------- margin
def test_margin_loss_by_hand():
    # Two equal logits: CE = log 2 for either label.
    np.testing.assert_allclose(
        margin(jnp.zeros(2), jnp.asarray(0), margin=5.0), (math.log(2) - 5.0) ** 2, rtol=1e-6
    )
    logits = jnp.asarray([2.0, 0.0, -1.0])
    ce = -math.log(_softmax([2.0, 0.0, -1.0])[2])
    got = margin(logits, jnp.asarray(2), margin=1.5)
    np.testing.assert_allclose(got, (ce - 1.5) ** 2, rtol=1e-6)
    batched = margin(jnp.stack([logits, logits]), jnp.asarray([2, 2]), margin=1.5)
    np.testing.assert_allclose(batched, [(ce - 1.5) ** 2] * 2, rtol=1e-6)


# ------------------------------------------------------------------------------ REINFORCE
@functools.partial(jax.jit, static_argnames="entropy_coef")
def reinforce(log_probs, rewards, entropies, entropy_coef):
    return losses.reinforce_loss(log_probs, rewards, entropies, entropy_coef=entropy_coef)


LOG_PROBS = jnp.asarray([-1.0, -2.0, -3.0])
REWARDS = jnp.asarray([1.0, 2.0, 4.0])
ENTROPIES = jnp.asarray([0.5, 1.0, 1.5])


def test_reinforce_by_hand():
    # Leave-one-out baselines: (7 - 1) / 2 = 3, (7 - 2) / 2 = 2.5, (7 - 4) / 2 = 1.5;
    # advantages -2, -0.5, 2.5; -mean(adv * logp) = -mean(2, 1, -7.5) = 1.5;
    # entropy bonus 0.1 * mean(0.5, 1, 1.5) = 0.1; loss = 1.4.
    loss, aux = reinforce(LOG_PROBS, REWARDS, ENTROPIES, 0.1)
    np.testing.assert_allclose(aux["baseline"], [3.0, 2.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(aux["advantages"], [-2.0, -0.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(loss, 1.4, rtol=1e-6)


def test_reinforce_gradients():
    grad_fn = jax.jit(
        jax.grad(
            lambda lp, r, e: losses.reinforce_loss(lp, r, e, entropy_coef=0.1)[0], argnums=(0, 1, 2)
        )
    )
    g_lp, g_r, g_e = grad_fn(LOG_PROBS, REWARDS, ENTROPIES)
    np.testing.assert_allclose(g_lp, -np.asarray([-2.0, -0.5, 2.5]) / 3, rtol=1e-6)
    np.testing.assert_array_equal(g_r, 0.0)  # rewards and the baseline carry no gradient
    np.testing.assert_allclose(g_e, -0.1 / 3, rtol=1e-6)


def test_reinforce_equal_rewards_give_zero_advantage_and_vmaps_over_batch():
    rewards = jnp.asarray([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]])  # [B=2, P=3]
    log_probs = jnp.stack([LOG_PROBS, LOG_PROBS])
    entropies = jnp.stack([ENTROPIES, ENTROPIES])
    loss, aux = jax.jit(
        jax.vmap(lambda lp, r, e: losses.reinforce_loss(lp, r, e, entropy_coef=0.0))
    )(log_probs, rewards, entropies)
    np.testing.assert_allclose(aux["advantages"][0], 0.0, atol=1e-7)
    np.testing.assert_allclose(loss, [0.0, 1.5], atol=1e-6)


def test_reinforce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="P >= 2"):
        losses.reinforce_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), entropy_coef=0.0)
    with pytest.raises(ValueError, match=r"shape \[P\]"):
        losses.reinforce_loss(jnp.zeros(3), jnp.zeros(2), jnp.zeros(3), entropy_coef=0.0)
    with pytest.raises(ValueError, match=r"shape \[P\]"):
        batched = jnp.zeros((2, 3))  # [B, P]: vmap over B instead
        losses.reinforce_loss(batched, batched, batched, entropy_coef=0.0)
