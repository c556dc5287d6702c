"""ptq_adversary.transform: sites derived from the program equal a hand-written quantized pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import quant, transform

DN = ("NHWC", "HWIO", "NHWC")


class LinenCNN(nn.Module):
    """A plain linen CNN with a residual 1x1 branch: 3 sites (conv2, conv3, head)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))
        x = x + nn.Conv(8, (1, 1), name="conv3")(nn.relu(x))  # two values cross conv3's cut
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def _linen():
    module = LinenCNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    # non-trivial running statistics, so BatchNorm in inference mode is not the identity
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return module, {**variables, **updates}, x


def _hand_written(variables, x, bits, weight_bits=8):
    """The same network written out with the quantizers inserted by hand."""
    p, st = variables["params"], variables["batch_stats"]["BatchNorm_0"]
    wq = lambda w: w if weight_bits is None else quant.fake_quant_weight(w, weight_bits)

    def conv(h, name, stride):
        k = wq(p[name]["kernel"])
        y = jax.lax.conv_general_dilated(h, k, (stride, stride), "SAME", dimension_numbers=DN)
        return y + p[name]["bias"]

    h = conv(x, "Conv_0", 1)
    bn = p["BatchNorm_0"]
    h = jax.nn.relu((h - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"])
    h = jax.nn.relu(conv(quant.fake_quant_activation(h, bits[:, 0]), "conv2", 2))
    h = h + conv(quant.fake_quant_activation(jax.nn.relu(h), bits[:, 1]), "conv3", 1)
    h = quant.fake_quant_activation(h.mean((1, 2)), bits[:, 2])
    return h @ wq(p["head"]["kernel"]) + p["head"]["bias"]


def _bits(key, shape, lo=2, hi=9):
    return jax.random.randint(jax.random.PRNGKey(key), shape, lo, hi)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv1(x)))
        return self.head(jax.nn.relu(self.conv2(x)).mean((1, 2)))


def test_linen_sites_names_and_description():
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x)
    assert qfn.num_sites == 3
    assert qfn.site_names == ("conv2", "conv3", "head")
    assert [s.op for s in qfn.sites] == ["conv", "conv", "dense"]
    assert qfn.sites[0].data_shape == (1, 8, 8, 8)
    assert qfn.sites[0].weight_shape == (3, 3, 8, 8)
    assert qfn.sites[2].out_shape == (1, 10)
    # FLOPs shares of the sites plus the first conv add up to 1
    first = 2 * 8 * 8 * 8 * 9 * 1
    total = first + sum(s.flops for s in qfn.sites)
    assert qfn.sites[0].flops == 2 * 4 * 4 * 8 * 9 * 8
    assert sum(s.flops_share for s in qfn.sites) == pytest.approx(1 - first / total)
    assert "conv2" in qfn.describe() and "FLOPs" in qfn.describe()


@pytest.mark.parametrize("weight_bits", [8, 4, None])
def test_linen_matches_hand_written_pass_and_fp(weight_bits):
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x, weight_bits=weight_bits)
    bits = _bits(2, (5, 3))
    got = jax.jit(qfn)(variables, x, bits)
    want = jax.jit(_hand_written, static_argnums=3)(variables, x, bits, weight_bits)
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


def test_quantize_first_makes_the_input_layer_a_site():
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x, quantize_first=True)
    assert qfn.site_names == ("Conv_0", "conv2", "conv3", "head")


def test_vmap_over_policies_equals_loop_and_compiles_once():
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x)
    traces = []

    @jax.jit
    def evaluate(bits_pbl):
        traces.append(1)
        return jax.vmap(lambda b: qfn(variables, x, b))(bits_pbl)

    bits_pbl = _bits(3, (6, 5, 3))
    together = np.asarray(evaluate(bits_pbl))
    loop = np.stack([np.asarray(jax.jit(qfn)(variables, x, b)) for b in bits_pbl])
    np.testing.assert_allclose(together, loop, rtol=1e-6, atol=1e-6)
    evaluate(_bits(4, (6, 5, 3)))
    evaluate(jnp.full((6, 5, 3), 8, jnp.int32))
    assert len(traces) == 1


def test_per_example_ranges_do_not_depend_on_the_batch():
    module, variables, x = _linen()
    qfn = jax.jit(transform.quantize(module.apply, variables, x))
    bits = _bits(5, (5, 3))
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


def test_no_site_and_dead_sites_are_refused():
    w = jnp.ones((4, 3))
    with pytest.raises(transform.TransformError, match="no quantization site"):
        transform.quantize(lambda w, x: x @ w, w, jnp.ones((2, 4)))  # only the input layer

    def dead(w, x):
        h = jnp.tanh(x @ w)
        _ = h.T @ h  # computed, never used
        return h

    with (
        pytest.raises(transform.TransformError, match="no quantization site"),
        pytest.warns(UserWarning, match="do not reach the output"),
    ):
        transform.quantize(dead, w, jnp.ones((2, 4)), activation_products="quantize")


def test_mixing_examples_is_refused():
    module, variables, x = _linen()
    train = lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0]
    with pytest.raises(transform.TransformError, match="mixes examples"):
        transform.quantize(train, variables, x)
    model = NNXNet(nnx.Rngs(0))  # train mode: batch statistics
    graphdef, state = nnx.split(model)
    with pytest.raises(transform.TransformError, match=r"model\.eval\(\)"):
        transform.quantize(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


def test_bad_calls_are_rejected():
    module, variables, x = _linen()
    with pytest.raises(TypeError, match="linen"):
        transform.quantize(module.apply, None, x)
    qfn = transform.quantize(module.apply, variables, x)
    with pytest.raises(ValueError, match=r"bits must be \[B, L\] = \[5, 3\]"):
        qfn(variables, x, jnp.full((5, 2), 4))
    with pytest.raises(TypeError, match="integer"):
        qfn(variables, x, jnp.full((5, 3), 4.0))
    with pytest.raises(ValueError, match="x must be"):
        qfn(variables, jnp.ones((5, 8, 8, 3)), jnp.full((5, 3), 4))


def test_segments_chain_to_the_full_pass():
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x)
    assert qfn.num_segments == 4
    bits = _bits(7, (5, 3))
    full = np.asarray(qfn(variables, x, bits))
    h = x
    for k in range(qfn.num_segments):
        h = jax.jit(qfn.run_segments, static_argnums=(3, 4))(variables, h, bits, k, k)
    np.testing.assert_allclose(np.asarray(h), full, rtol=1e-6, atol=1e-6)
    # the cut before conv3's quantizer carries its input and the residual branch's
    live = qfn.run_segments(variables, x, bits, 0, 1)
    assert isinstance(live, tuple) and len(live) == 2
    one_alloc = qfn.run_segments(variables, x, bits[0], 0, 3)
    np.testing.assert_allclose(
        one_alloc, qfn(variables, x, jnp.broadcast_to(bits[0], (5, 3))), rtol=1e-6, atol=1e-6
    )


def test_integer_mode_agrees_with_fake_quantization():
    module, variables, x = _linen()
    qfn = transform.quantize(module.apply, variables, x)
    bits = _bits(8, (5, 3))
    fake = np.asarray(qfn(variables, x, bits))
    integer = np.asarray(jax.jit(lambda v, x, b: qfn(v, x, b, mode="integer"))(variables, x, bits))
    np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(integer, np.asarray(qfn(variables, x)))
    jaxpr = str(jax.make_jaxpr(lambda v, x, b: qfn(v, x, b, mode="integer"))(variables, x, bits))
    assert "preferred_element_type=int32" in jaxpr
    with pytest.raises(ValueError, match="integer mode"):
        q32 = transform.quantize(module.apply, variables, x, weight_bits=None)
        q32(variables, x, bits, mode="integer")


def _force_vmapped(qfn, batch):
    qfn._batched[batch] = None  # the per-example program, vmapped over the batch
    return qfn


def test_batched_program_equals_the_vmapped_per_example_program():
    module, variables, x = _linen()
    fast = transform.quantize(module.apply, variables, x)
    slow = _force_vmapped(transform.quantize(module.apply, variables, x), 5)
    bits = _bits(11, (5, 3))
    assert fast._batched_program(5) is not None
    for mode in ("fake", "integer"):
        a = jax.jit(lambda v, x, b, m=mode: fast(v, x, b, mode=m))(variables, x, bits)
        b = jax.jit(lambda v, x, b, m=mode: slow(v, x, b, mode=m))(variables, x, bits)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda v, q=q: jnp.sum(q(v, x, bits) ** 2))(variables) for q in (fast, slow)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_axis_is_located_wherever_the_model_puts_it():
    w1 = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    w2 = jax.random.normal(jax.random.PRNGKey(1), (6, 3))

    def time_major(p, x):  # x [B, T, D] -> [T, B, D] before the layers
        h = jnp.tanh(jnp.swapaxes(x, 0, 1) @ p[0])
        return jnp.swapaxes(h @ p[1], 0, 1).mean(axis=1)

    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5, 4))
    qfn = transform.quantize(time_major, [w1, w2], x, weight_bits=None)
    axes = qfn._batched_program(4).batch_axes
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
    assert qfn._batched_program(3) is None
    bits = jnp.array([[2], [4], [8]])
    h = [jnp.tanh(x[i] @ w1) for i in range(3)]  # [T, 6] per example: one range for all T
    want = np.stack(
        [(quant.fake_quant_activation(h[i][None], bits[i])[0] @ w2).mean(0) for i in range(3)]
    )
    np.testing.assert_allclose(qfn([w1, w2], x, bits), want, rtol=1e-6, atol=1e-6)
