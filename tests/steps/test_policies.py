"""``ptq_adversary.steps.policies``: the chunked policy map equals the full vmap (values and
gradients), and the evaluation step does not depend on the chunk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import backend, quant, steps
from tests.steps.cases import ATOL, RTOL, random_bits, tiny_cnn


@pytest.fixture(scope="module")
def tiny():
    return tiny_cnn()


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
    bits = random_bits(num_policies, 3, 2, seed=num_policies)
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
    bits = random_bits(5, 3, 2, seed=3)

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
        steps.map_policies(fn, random_bits(3, 3, 2), chunk=0)
    empty = jnp.zeros((0, 3, 2), jnp.int32)
    assert steps.map_policies(fn, empty)["out"].shape == (0, 3, 8)


def test_eval_step_does_not_depend_on_the_chunk(tiny):
    model, graphdef, params, rest, images = tiny
    labels = jnp.arange(images.shape[0]) % 10
    mask = jnp.ones(images.shape[0])
    bits = random_bits(5, images.shape[0], model.num_sites, seed=7)
    outs = [
        jax.jit(steps.make_eval_step(graphdef, chunk=c))(params, rest, images, labels, mask, bits)
        for c in (2, 5)  # chunks of 2 with a remainder of 1; one vmap
    ]
    for out in outs[1:]:
        for k in outs[0]:
            np.testing.assert_allclose(out[k], outs[0][k], rtol=RTOL, atol=ATOL)
