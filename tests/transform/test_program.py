"""transform.program: which conv/dots are sites, through calls, loops and activation products."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import quant, transform
from tests.transform.nets import linen


def test_quantize_first_makes_the_input_layer_a_site():
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x, quantize_first=True)
    assert qfn.site_names == ("Conv_0", "conv2", "conv3", "head")


def test_sites_inside_jit_remat_and_custom_rules_are_found():
    w = [jax.random.normal(jax.random.PRNGKey(i), (4, 4)) for i in range(4)]

    @jax.custom_jvp
    def custom(h, w):
        return h @ w

    custom.defjvp(lambda p, t: (custom(*p), t[0] @ p[1] + p[0] @ t[1]))

    @jax.custom_vjp
    def custom_v(h, w):
        return h @ w

    custom_v.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def fn(p, x):
        h = jnp.tanh(x @ p[0])
        h = jax.jit(lambda h: jnp.tanh(h @ p[1]))(h)
        h = jax.checkpoint(lambda h: jnp.tanh(h @ p[2]))(h)
        h = custom(h, p[3])
        return custom_v(h, p[0])

    x = jax.random.normal(jax.random.PRNGKey(9), (2, 4))
    qfn = transform.quantize(fn, w, x, weight_bits=None)
    assert qfn.num_sites == 4
    bits = jnp.array([[2, 3, 4, 5], [6, 7, 8, 2]])
    fq = quant.fake_quant_activation
    h = jnp.tanh(x @ w[0])
    h = jnp.tanh(fq(h, bits[:, 0]) @ w[1])
    h = jnp.tanh(fq(h, bits[:, 1]) @ w[2])
    h = fq(h, bits[:, 2]) @ w[3]
    want = fq(h, bits[:, 3]) @ w[0]
    np.testing.assert_allclose(qfn(w, x, bits), want, rtol=1e-6, atol=1e-6)
    jax.grad(lambda w: qfn(w, x, bits).sum())(w)  # differentiable through the inlined bodies


def test_custom_jvp_without_site_keeps_its_rule():
    x = jnp.array([[0.0, 1.0, -1.0]])
    w = jnp.eye(3)
    fn = lambda w, x: jax.nn.relu(jax.nn.relu(x @ w) @ w)  # relu is a custom_jvp
    qfn = transform.quantize(fn, w, x, weight_bits=None)
    g = jax.grad(lambda x: qfn(w, x, jnp.full((1, 1), 16)).sum())(x)
    np.testing.assert_array_equal(g, jax.grad(lambda x: fn(w, x).sum())(x))


def test_site_inside_scan_is_refused_with_the_fix():
    ws = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4))

    def fn(ws, x):
        h = jnp.tanh(x @ ws[0])
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)
        return h

    with pytest.raises(transform.TransformError, match=r"lax\.scan.*Unroll"):
        transform.quantize(fn, ws, jnp.ones((2, 4)))


def test_linen_scan_is_refused():
    class Body(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(nn.Dense(4)(h)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            scan = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan()(h, None)[0]

    module = Scanned()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    with pytest.raises(transform.TransformError, match="scan"):
        transform.quantize(module.apply, variables, jnp.ones((2, 4)))


def test_loop_without_sites_is_kept():
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 4))

    def fn(w, x):
        h = jnp.tanh(x @ w)
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.sin(h), h)  # elementwise loop: no site
        return h @ w

    qfn = transform.quantize(fn, w, jnp.ones((2, 4)))
    assert qfn.num_sites == 1


def test_activation_products_choice():
    wq = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    wk = jax.random.normal(jax.random.PRNGKey(1), (4, 4))

    def attention(p, x):  # x [B, T, D]
        q, k = x @ p["q"], x @ p["k"]
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
        return jnp.einsum("bts,bsd->btd", a, x)

    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4))
    p = {"q": wq, "k": wk}
    skip = transform.quantize(attention, p, x, quantize_first=True)
    assert [s.op for s in skip.sites] == ["dense", "dense"]
    both = transform.quantize(attention, p, x, quantize_first=True, activation_products="quantize")
    assert [s.op for s in both.sites] == ["dense", "dense", "matmul", "matmul"]
    bits = jnp.array([[8, 8, 2, 8], [8, 8, 2, 8]])
    fq, w8 = quant.fake_quant_activation, lambda w: quant.fake_quant_weight(w, 8)
    q, k = fq(x, bits[:, 0]) @ w8(wq), fq(x, bits[:, 1]) @ w8(wk)
    s = jnp.einsum("btd,bsd->bts", fq(q, bits[:, 2]), fq(k, bits[:, 2]))
    a = jax.nn.softmax(s, axis=-1)
    want = jnp.einsum("bts,bsd->btd", fq(a, bits[:, 3]), fq(x, bits[:, 3]))
    np.testing.assert_allclose(both(p, x, bits), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(transform.TransformError, match="two activations"):
        transform.quantize(attention, p, x, activation_products="error")
