"""Many policies at once: the chunked policy map equals the full vmap (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ptq_adversary import backend, models, policy, policy_net, quant, steps

CHOICES = (2, 3, 4, 5, 6, 8)
# Chunked and full vmaps run convolutions of different batch sizes, which XLA:CPU may sum in
# a different order: equal up to float32 rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def tiny():
    model = models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0), widths=(4, 8), strides=(1, 2)
    )  # 2 sites: conv2 and head; small, so the steps compile in seconds
    graphdef, params, rest = models.split_model(model)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 10, 10, 1))
    return model, graphdef, params, rest, images


def _bits(num_policies, batch, num_sites, seed=0):
    idx = jax.random.randint(jax.random.PRNGKey(seed), (num_policies, batch, num_sites), 0, 6)
    return jnp.asarray(CHOICES, jnp.int32)[idx]


def _toy(x_bd, w_dc, bits_bl):
    """A cheap stand-in for a quantized network: one quantized site and a dense layer."""
    y = quant.fake_quant_activation(x_bd, bits_bl[:, 0]) @ w_dc
    y = quant.fake_quant_activation(jnp.tanh(y), bits_bl[:, 1])
    return {"out": y, "top": jnp.max(y)}


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize(
    ("num_policies", "chunk"), [(5, 1), (5, 2), (7, 3), (6, 4), (6, 6), (4, 9), (1, 1)]
)
def test_chunked_policy_map_equals_vmap(num_policies, chunk, unroll):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    bits = _bits(num_policies, 3, 2, seed=num_policies)
    fn = functools.partial(_toy, x, w)
    got = jax.jit(lambda b: steps.map_policies(fn, b, chunk=chunk, unroll=unroll))(bits)
    want = jax.jit(jax.vmap(fn))(bits)
    assert got["out"].shape == (num_policies, 3, 8) and got["top"].shape == (num_policies,)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL)
    if num_policies > 1:  # each policy still sees its own bits
        assert not np.allclose(got["out"][0], got["out"][1])


@pytest.mark.parametrize("unroll", [False, True])
def test_chunked_policy_map_gradients_equal_vmap(unroll):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    bits = _bits(5, 3, 2, seed=3)

    def loss(x, w, chunk):
        out = steps.map_policies(functools.partial(_toy, x, w), bits, chunk=chunk, unroll=unroll)
        return jnp.sum(out["out"] ** 2) + out["top"].sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for want, got in zip(grad(x, w, 5), grad(x, w, 2), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(got)).max() > 0


def test_policy_chunk_default_per_backend():
    target = backend.POLICY_CHUNK_EXAMPLES["cpu"]
    assert backend.policy_chunk(64, target // 4, backend="cpu") == 4
    assert backend.policy_chunk(3, 1, backend="cpu") == 3  # never more than P
    assert backend.policy_chunk(64, 10 * target, backend="cpu") == 1  # at least one policy
    assert backend.policy_chunk(64, 128, backend="no-such-backend") == 64  # one vmap
    assert backend.policy_chunk(0, 128, backend="no-such-backend") == 1
    grad_target = backend.GRAD_CHUNK_EXAMPLES["cpu"]
    assert backend.policy_chunk(8, grad_target, backend="cpu", differentiated=True) == 1
    assert backend.policy_chunk(8, grad_target // 2, backend="cpu", differentiated=True) == 2


def test_map_policies_rejects_bad_chunk_and_handles_no_policies():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
    fn = jax.jit(functools.partial(_toy, x, jnp.ones((16, 8))))
    with pytest.raises(ValueError, match="chunk"):
        steps.map_policies(fn, _bits(3, 3, 2), chunk=0)
    empty = jnp.zeros((0, 3, 2), jnp.int32)
    assert steps.map_policies(fn, empty)["out"].shape == (0, 3, 8)


def test_eval_steps_do_not_depend_on_the_chunk(tiny):
    model, graphdef, params, rest, images = tiny
    labels = jnp.arange(images.shape[0]) % 10
    mask = jnp.ones(images.shape[0])
    bits = _bits(5, images.shape[0], model.num_sites, seed=7)
    outs = [
        jax.jit(steps.make_eval_step(graphdef, chunk=c))(params, rest, images, labels, mask, bits)
        for c in (2, 5)  # chunks of 2 with a remainder of 1; one vmap
    ]
    for out in outs[1:]:
        for k in outs[0]:
            np.testing.assert_allclose(out[k], outs[0][k], rtol=RTOL, atol=ATOL)

    budget = policy.Budget(choices=CHOICES, num_sites=model.num_sites, budget=4.0)
    pol = policy_net.PolicyNet(
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
    pol = policy_net.PolicyNet(
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
