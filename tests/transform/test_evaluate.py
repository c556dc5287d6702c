"""transform.evaluate: the quantized program equals a hand-written quantized pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import quant, transform
from tests.transform.nets import NNXNet, hand_written, linen, random_bits


@pytest.mark.parametrize("weight_bits", [8, 4, None])
def test_linen_matches_hand_written_pass_and_fp(weight_bits):
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x, weight_bits=weight_bits)
    bits = random_bits(2, (5, 3))
    got = jax.jit(qfn)(variables, x, bits)
    want = jax.jit(hand_written, static_argnums=3)(variables, x, bits, weight_bits)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(qfn(variables, x)), module.apply(variables, x))


def test_nnx_state_function_matches_module():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    qfn = transform.quantize(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert qfn.site_names == ("conv2", "head")
    np.testing.assert_array_equal(np.asarray(qfn(state, x)), np.asarray(model(x)))
    # at 16 bits the quantized output is close to FP, at 2 bits it is not
    near = qfn(state, x, jnp.full((4, 2), 16), mode="fake")
    np.testing.assert_allclose(near, model(x), atol=2e-2)


def test_plain_jax_function_and_closed_over_weights():
    w1 = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    w2 = jax.random.normal(jax.random.PRNGKey(1), (5, 3))

    def fn(params, x):  # w2 is a constant of the program, params holds w1
        return jnp.tanh(x @ params["w1"]) @ w2

    x = jax.random.normal(jax.random.PRNGKey(2), (3, 6))
    qfn = transform.quantize(fn, {"w1": w1}, x)
    assert qfn.num_sites == 1 and qfn.sites[0].weight_shape == (5, 3)
    bits = jnp.array([[2], [3], [8]])
    h = quant.fake_quant_activation(jnp.tanh(x @ quant.fake_quant_weight(w1, 8)), bits[:, 0])
    want = h @ quant.fake_quant_weight(w2, 8)
    np.testing.assert_array_equal(np.asarray(qfn({"w1": w1}, x, bits)), np.asarray(want))


def test_vmap_over_policies_equals_loop_and_compiles_once():
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x)
    traces = []

    @jax.jit
    def evaluate(bits_pbl):
        traces.append(1)
        return jax.vmap(lambda b: qfn(variables, x, b))(bits_pbl)

    bits_pbl = random_bits(3, (6, 5, 3))
    together = np.asarray(evaluate(bits_pbl))
    loop = np.stack([np.asarray(jax.jit(qfn)(variables, x, b)) for b in bits_pbl])
    np.testing.assert_allclose(together, loop, rtol=1e-6, atol=1e-6)
    evaluate(random_bits(4, (6, 5, 3)))
    evaluate(jnp.full((6, 5, 3), 8, jnp.int32))
    assert len(traces) == 1


def test_per_example_ranges_do_not_depend_on_the_batch():
    module, variables, x = linen()
    qfn = jax.jit(transform.quantize(module.apply, variables, x))
    bits = random_bits(5, (5, 3))
    full = np.asarray(qfn(variables, x, bits))
    other = x.at[1:].set(100.0 * x[1:] + 3.0)  # the other examples change wildly
    np.testing.assert_array_equal(np.asarray(qfn(variables, other, bits))[0], full[0])
    for i in range(5):
        alone = np.asarray(qfn(variables, x[i : i + 1], bits[i : i + 1]))[0]
        np.testing.assert_allclose(alone, full[i], rtol=1e-6, atol=1e-6)


def test_straight_through_gradients():
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    v = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    fn = lambda p, x: jax.nn.relu(x @ p["w"]) @ p["v"]
    qfn = transform.quantize(fn, {"w": w, "v": v}, x, weight_bits=None)
    bits = jnp.full((3, 1), 3)
    gx = jax.grad(lambda x: qfn({"w": w, "v": v}, x, bits).sum())(x)
    # STE: d/dh of quant(h) is the identity, so the gradient is the FP one evaluated at h
    h = jax.nn.relu(x @ w)
    want = jax.grad(lambda x: (jax.nn.relu(x @ w) @ v).sum())(x)
    np.testing.assert_allclose(gx, want, rtol=1e-6)
    assert jnp.all(h >= 0)
    gp = jax.grad(lambda p: qfn(p, x, bits).sum())({"w": w, "v": v})
    assert float(jnp.abs(gp["w"]).sum()) > 0 and float(jnp.abs(gp["v"]).sum()) > 0


def test_integer_mode_agrees_with_fake_quantization():
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x)
    bits = random_bits(8, (5, 3))
    fake = np.asarray(qfn(variables, x, bits))
    integer = np.asarray(jax.jit(lambda v, x, b: qfn(v, x, b, mode="integer"))(variables, x, bits))
    np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(integer, np.asarray(qfn(variables, x)))
    jaxpr = str(jax.make_jaxpr(lambda v, x, b: qfn(v, x, b, mode="integer"))(variables, x, bits))
    assert "preferred_element_type=int32" in jaxpr
    with pytest.raises(ValueError, match="integer mode"):
        q32 = transform.quantize(module.apply, variables, x, weight_bits=None)
        q32(variables, x, bits, mode="integer")
