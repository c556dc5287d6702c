"""``ptq_adversary.steps.pair``: the stage-B steps do not depend on the policy chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ptq_adversary import policy, steps
from tests.steps.cases import ATOL, CHOICES, RTOL, tiny_cnn


@pytest.fixture(scope="module")
def tiny():
    return tiny_cnn()


def test_pair_eval_step_does_not_depend_on_the_chunk(tiny):
    model, graphdef, params, rest, images = tiny
    labels = jnp.arange(images.shape[0]) % 10
    mask = jnp.ones(images.shape[0])
    budget = policy.Budget(choices=CHOICES, num_sites=model.num_sites, budget=4.0)
    pol = policy.PolicyNet(
        num_sites=model.num_sites, num_choices=6, in_channels=1, widths=(4,), rngs=nnx.Rngs(0)
    )
    pg, pp, pr = nnx.split(pol, nnx.Param, ...)
    pair = [
        jax.jit(steps.make_pair_eval_step(graphdef, pg, budget, num_random=3, chunk=c))(
            params, rest, pp, pr, images, labels, mask, jax.random.PRNGKey(0)
        )
        for c in (2, 5)
    ]
    for k in pair[0]:
        np.testing.assert_allclose(pair[1][k], pair[0][k], rtol=RTOL, atol=ATOL)


def test_pair_train_step_does_not_depend_on_the_chunk(tiny):
    model, graphdef, params, rest, images = tiny
    budget = policy.Budget(choices=CHOICES, num_sites=model.num_sites, budget=4.0)
    pol = policy.PolicyNet(
        num_sites=model.num_sites, num_choices=6, in_channels=1, widths=(4,), rngs=nnx.Rngs(0)
    )
    pg, pp, pr = nnx.split(pol, nnx.Param, ...)
    opt, popt = optax.adam(1e-2), optax.adam(1e-2)
    state = steps.create_pair_state(params, rest, opt, pp, pr, popt, seed=0)
    labels = jnp.arange(images.shape[0]) % 10
    teacher = jax.random.normal(jax.random.PRNGKey(2), (images.shape[0], 10))
    outs = []
    for chunk in (3, 2):  # P = 3: one vmap, then chunks of 2 + a remainder of 1
        step = steps.make_pair_train_step(
            graphdef, pg, opt, popt, budget, mode="robust", num_samples=3, temperature=4.0,
            quant_weight=1.0, margin=5.0, reward="kl", entropy_coef=0.01, chunk=chunk,
        )  # fmt: skip
        outs.append(jax.jit(step)(state, images, labels, teacher))
    (s0, m0), (s1, m1) = outs
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
