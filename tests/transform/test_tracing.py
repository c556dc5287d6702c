"""transform.tracing: locating the batch axis of a batched trace, or falling back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import quant, transform


def test_batch_axis_is_located_wherever_the_model_puts_it():
    w1 = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    w2 = jax.random.normal(jax.random.PRNGKey(1), (6, 3))

    def time_major(p, x):  # x [B, T, D] -> [T, B, D] before the layers
        h = jnp.tanh(jnp.swapaxes(x, 0, 1) @ p[0])
        return jnp.swapaxes(h @ p[1], 0, 1).mean(axis=1)

    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5, 4))
    qfn = transform.quantize(time_major, [w1, w2], x, weight_bits=None)
    axes = qfn.batched_program(4).batch_axes
    assert [a for a, _ in axes.values()] == [(1,)]  # the site's data operand is [T, B, 6]
    bits = jnp.array([[2], [3], [5], [8]])
    h = [jnp.tanh(x[i] @ w1) for i in range(4)]  # one example at a time: its own range
    want = np.stack(
        [(quant.fake_quant_activation(h[i][None], bits[i]) @ w2)[0].mean(0) for i in range(4)]
    )
    np.testing.assert_allclose(qfn([w1, w2], x, bits), want, rtol=1e-6, atol=1e-6)


def test_batch_merged_into_another_axis_falls_back_to_per_example():
    w1 = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    w2 = jax.random.normal(jax.random.PRNGKey(1), (6, 3))

    def tokens(p, x):  # [B, T, D] -> [B * T, D]: the batch axis is not a separate axis
        b, t, d = x.shape
        h = jnp.tanh(x.reshape(b * t, d) @ p[0])
        return (h @ p[1]).reshape(b, t, 3).mean(axis=1)

    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 4))
    qfn = transform.quantize(tokens, [w1, w2], x, weight_bits=None)
    assert qfn.batched_program(3) is None
    bits = jnp.array([[2], [4], [8]])
    h = [jnp.tanh(x[i] @ w1) for i in range(3)]  # [T, 6] per example: one range for all T
    want = np.stack(
        [(quant.fake_quant_activation(h[i][None], bits[i])[0] @ w2).mean(0) for i in range(3)]
    )
    np.testing.assert_allclose(qfn([w1, w2], x, bits), want, rtol=1e-6, atol=1e-6)
