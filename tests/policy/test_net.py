"""``ptq_adversary.policy.net``: the policy network and its greedy decode of a batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import policy
from ptq_adversary.policy import Budget
from tests.policy.cases import DEFAULT, entropy_many, greedy_many


# ------------------------------------------------------------------------------ PolicyNet
def test_policy_net_shapes_and_uniform_initial_policy():
    budget = Budget(DEFAULT, 4, 7)
    # An "rbg" key: threefry's truncated-normal init compiles for seconds per conv on CPU.
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    net = policy.PolicyNet(num_sites=4, num_choices=6, in_channels=3, rngs=rngs)
    graphdef, state = nnx.split(net)

    @jax.jit
    def forward_and_grad(state, x, bit_idx):
        def total_log_prob(state):
            logits = nnx.merge(graphdef, state)(x)
            logp = jax.vmap(lambda lg, b: policy.log_prob(lg, b, budget))(logits, bit_idx)
            return jnp.sum(logp), (logits, logp)

        return jax.grad(total_log_prob, has_aux=True)(state)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 12, 12, 3)), jnp.float32)
    allocations = policy.enumerate_allocations(budget)[:5]
    grads, (logits, logp) = forward_and_grad(state, x, allocations)
    assert logits.shape == (5, 4, 6) and logits.dtype == jnp.float32
    # Zero-initialised head: every input gets zero logits, i.e. each site's conditional is
    # uniform over its allowed choices, so log_prob is -sum_l log(#allowed_l).
    np.testing.assert_array_equal(logits, 0.0)
    expected = -np.asarray(entropy_many(jnp.zeros((4, 6)), allocations, budget))
    np.testing.assert_allclose(logp, expected, rtol=1e-6)
    # ... yet the head is trainable from the first step (its gradient is not zero).
    assert np.any(np.asarray(grads["head"]["kernel"][...]) != 0.0)


def test_policy_net_without_convs_and_bad_input():
    net = policy.PolicyNet(num_sites=2, num_choices=3, in_channels=1, widths=(), rngs=nnx.Rngs(1))
    assert net(jnp.ones((2, 4, 4, 1))).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="NHWC"):
        net(jnp.ones((4, 4, 1)))


def test_greedy_allocation_is_the_per_image_greedy_decode():
    budget = Budget(DEFAULT, 4, 7)
    rngs = nnx.Rngs(jax.random.key(2, impl="rbg"))
    net = policy.PolicyNet(num_sites=4, num_choices=6, in_channels=1, widths=(4,), rngs=rngs)
    head = np.random.default_rng(3).normal(size=net.head.kernel.shape)
    net.head.kernel[...] = jnp.asarray(head, jnp.float32)  # input-dependent logits
    graphdef, state = nnx.split(net)
    images = jnp.asarray(np.random.default_rng(4).normal(size=(8, 6, 6, 1)), jnp.float32)
    bit_idx = jax.jit(lambda s, x: policy.greedy_allocation(graphdef, s, images=x, budget=budget))(
        state, images
    )
    assert bit_idx.dtype == jnp.int32 and bit_idx.shape == (8, 4)
    np.testing.assert_array_equal(bit_idx, greedy_many(net(images), budget))
