"""Tests for the quantizable building blocks in ptq_adversary.layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import layers, models
from ptq_adversary.quant import fake_quant_activation, fake_quant_weight


def _rngs(seed=0):
    # The "rbg" PRNG compiles ~3x faster than threefry for every new parameter shape; on 2 CPU
    # cores that compile, not the math, dominates building the tiny test models.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# Reference computations are jitted too: eager op-by-op dispatch compiles every primitive
# separately, which costs more than the tests themselves on 2 CPU cores.
@functools.partial(jax.jit, static_argnames=("strides", "padding"))
def _conv(x, k, strides=1, padding=((1, 1), (1, 1))):  # 3x3 default: PyTorch's padding=1
    return jax.lax.conv_general_dilated(
        x, k, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


_fq_act = jax.jit(fake_quant_activation)
_fq_weight = jax.jit(fake_quant_weight, static_argnums=1)


def _images(key, shape=(3, 6, 6, 2)):
    return jax.random.normal(jax.random.key(key), shape)


def _jitted(layer, **flags):
    """`layer` as a jitted `(x, bits=None) -> y` through the functional boundary."""
    g, p, r = models.split_model(layer)
    return jax.jit(lambda x, bits=None: nnx.merge(g, p, r, copy=True)(x, bits, **flags))


def _call(layer, x, bits=None, **flags):
    return _jitted(layer, **flags)(x, bits)


# --- QConv / QDense -----------------------------------------------------------------------------


def test_qconv_full_precision_is_plain_conv_with_bias():
    layer = layers.QConv(2, 4, 3, strides=2, use_bias=True, rngs=_rngs())
    layer.bias[...] = jnp.arange(4.0)
    x = _images(1)
    expected = _conv(x, layer.kernel[...], strides=2) + jnp.arange(4.0)
    out = _call(layer, x)
    assert out.shape == (3, 3, 3, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_qconv_site_quantizes_input_per_example_and_weights_at_weight_bits():
    layer = layers.QConv(2, 4, 3, weight_bits=4, name="c", rngs=_rngs())
    assert (layer.num_sites, layer.site_names) == (1, ("c",))
    x = _images(2)
    bits = jnp.array([[2], [5], [8]], jnp.int32)
    expected = _conv(_fq_act(x, bits[:, 0]), _fq_weight(layer.kernel[...], 4))
    np.testing.assert_allclose(_call(layer, x, bits), expected, rtol=1e-5, atol=1e-5)


def test_first_layer_has_no_site_but_quantizes_weights_when_bits_given():
    layer = layers.QConv(2, 4, 3, quantize_input=False, weight_bits=2, rngs=_rngs())
    assert (layer.num_sites, layer.site_names) == (0, ())
    x = _images(3)
    no_sites = jnp.zeros((3, 0), jnp.int32)
    expected = _conv(x, _fq_weight(layer.kernel[...], 2))  # input left in float
    out = _call(layer, x, no_sites)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, _call(layer, x), atol=1e-3)  # 2-bit weights do change it


def test_weight_bits_none_keeps_weights_in_full_precision():
    layer = layers.QConv(2, 4, 3, weight_bits=None, rngs=_rngs())
    x = _images(4)
    bits = jnp.full((3, 1), 3, jnp.int32)
    expected = _conv(_fq_act(x, bits[:, 0]), layer.kernel[...])
    np.testing.assert_allclose(_call(layer, x, bits), expected, rtol=1e-5, atol=1e-5)


def test_qdense_full_precision_and_quantized():
    layer = layers.QDense(5, 3, weight_bits=3, name="head", rngs=_rngs())
    layer.bias[...] = jnp.array([1.0, -2.0, 0.5])
    x = jax.random.normal(jax.random.key(5), (4, 5))
    k, b = layer.kernel[...], layer.bias[...]
    np.testing.assert_allclose(_call(layer, x), x @ k + b, rtol=1e-5, atol=1e-5)
    bits = jnp.array([[2], [3], [4], [16]], jnp.int32)
    expected = _fq_act(x, bits[:, 0]) @ _fq_weight(k, 3) + b
    np.testing.assert_allclose(_call(layer, x, bits), expected, rtol=1e-5, atol=1e-5)


def test_layer_rejects_bits_of_the_wrong_shape():
    layer = layers.QConv(2, 4, 3, rngs=_rngs())
    x = _images(6)
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        layer(x, jnp.full((3,), 4, jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        layer(x, jnp.full((3, 2), 4, jnp.int32))


def test_ste_gradient_reaches_input_and_kernel():
    layer = layers.QConv(2, 4, 3, weight_bits=4, rngs=_rngs())
    g, p, r = models.split_model(layer)
    x = _images(7)
    bits = jnp.full((3, 1), 2, jnp.int32)

    def loss(p, x):
        return jnp.sum(nnx.merge(g, p, r, copy=True)(x, bits) ** 2)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
    for leaf in (*jax.tree.leaves(gp), gx):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


# --- BatchNorm ----------------------------------------------------------------------------------


def _bn_with_stats():
    bn = layers.BatchNorm(2, rngs=_rngs())
    bn.norm.mean[...] = jnp.array([0.5, -1.0])
    bn.norm.var[...] = jnp.array([4.0, 0.25])
    return bn


@pytest.mark.parametrize(
    ("train", "frozen_bn", "updates"),
    [(True, False, True), (True, True, False), (False, False, False), (False, True, False)],
)
def test_batchnorm_modes(train, frozen_bn, updates):
    bn = _bn_with_stats()
    g, p, r = models.split_model(bn)
    x = _images(8, (5, 3, 3, 2)) * 3.0 + 2.0

    @jax.jit
    def f(p, r, x):
        m = nnx.merge(g, p, r, copy=True)
        y = m(x, train=train, frozen_bn=frozen_bn)
        return y, nnx.split(m, nnx.Param, ...)[2]

    y, new_r = f(p, r, x)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(new_r), strict=True)
    ]
    assert all(changed) if updates else not any(changed)
    if updates:  # batch statistics: normalized output has ~zero mean, unit variance per channel
        np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, atol=1e-3)
    else:  # running statistics
        expected = (x - jnp.array([0.5, -1.0])) / jnp.sqrt(jnp.array([4.0, 0.25]) + 1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# --- split_bits and composite blocks ------------------------------------------------------------


def test_split_bits_slices_columns_in_order():
    blocks = [
        layers.QConv(1, 1, 1, quantize_input=False, rngs=_rngs()),
        layers.BasicBlock(1, 2, strides=2, name="b", rngs=_rngs()),  # 3 sites
        layers.QDense(2, 2, rngs=_rngs()),
    ]
    bits = jnp.arange(8).reshape(2, 4)
    parts = layers.split_bits(bits, blocks)
    assert [p.shape for p in parts] == [(2, 0), (2, 3), (2, 1)]
    np.testing.assert_array_equal(jnp.concatenate(parts, axis=1), bits)
    assert layers.split_bits(None, blocks) == [None, None, None]
    with pytest.raises(ValueError, match="b.conv1"):
        layers.split_bits(jnp.zeros((2, 5), jnp.int32), blocks)


@pytest.mark.parametrize("block_cls", [layers.BasicBlock, layers.PreActBlock])
def test_residual_block_sites(block_cls):
    keep = block_cls(4, 4, name="s1.b1", rngs=_rngs())
    assert keep.site_names == ("s1.b1.conv1", "s1.b1.conv2") and keep.shortcut is None
    proj = block_cls(4, 8, strides=2, name="s2.b1", rngs=_rngs())
    assert proj.num_sites == 3
    assert proj.site_names == ("s2.b1.conv1", "s2.b1.conv2", "s2.b1.shortcut")
    x = _images(9, (2, 6, 6, 4))
    f = _jitted(proj)
    assert f(x).shape == (2, 3, 3, 8)
    base = jnp.full((2, 3), 8, jnp.int32)
    out = f(x, base)
    for i in range(3):  # every site, the shortcut included, sees its own column
        changed = f(x, base.at[:, i].set(2))
        assert not np.allclose(out, changed, atol=1e-4), proj.site_names[i]


def test_basic_block_full_precision_matches_hand_forward():
    block = layers.BasicBlock(2, 3, strides=2, name="b", rngs=_rngs())
    x = _images(10, (2, 6, 6, 2))

    @jax.jit
    def hand(x):
        bn = jnp.sqrt(1.0 + 1e-5)  # fresh running stats: mean 0, var 1, scale 1, bias 0
        y = jax.nn.relu(_conv(x, block.conv1.conv.kernel[...], 2) / bn)
        y = _conv(y, block.conv2.conv.kernel[...], 1) / bn
        return jax.nn.relu(y + _conv(x, block.shortcut.conv.kernel[...], 2, "VALID") / bn)

    np.testing.assert_allclose(_call(block, x), hand(x), rtol=1e-5, atol=1e-5)


# --- a user-defined model gets the same interface -----------------------------------------------


class _TinyUserNet(nnx.Module):
    """conv (image, no site) -> relu -> conv (site "mid") -> pool -> dense (site "out")."""

    def __init__(self, rngs):
        self.first = layers.QConv(1, 3, 3, quantize_input=False, name="first", rngs=rngs)
        self.mid = layers.QConv(3, 4, 3, strides=2, name="mid", rngs=rngs)
        self.out = layers.QDense(4, 2, name="out", rngs=rngs)
        self.num_sites = sum(b.num_sites for b in (self.first, self.mid, self.out))
        self.site_names = self.first.site_names + self.mid.site_names + self.out.site_names

    def __call__(self, x, bits=None, *, train=False, frozen_bn=False):
        b = layers.split_bits(bits, [self.first, self.mid, self.out])
        y = jax.nn.relu(self.first(x, b[0]))
        y = jax.nn.relu(self.mid(y, b[1]))
        return self.out(jnp.mean(y, axis=(1, 2)), b[2])


def test_user_model_built_from_layers_gets_the_bits_interface():
    net = _TinyUserNet(_rngs())
    assert net.num_sites == 2 and net.site_names == ("mid", "out")
    g, p, r = models.split_model(net)
    x = _images(11, (3, 6, 6, 1))
    bits_pbl = jnp.array([[[2, 8]] * 3, [[8, 2]] * 3, [[4, 4], [2, 3], [8, 16]]], jnp.int32)
    apply = jax.jit(lambda b: models.apply_model(g, p, r, x, b)[0])
    looped = jnp.stack([apply(b) for b in bits_pbl])
    vmapped = jax.jit(jax.vmap(lambda b: models.apply_model(g, p, r, x, b)[0]))(bits_pbl)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6, atol=1e-6)
    assert not np.allclose(looped[0], looped[1], atol=1e-4)
    fp = jax.jit(lambda: models.apply_model(g, p, r, x)[0])()
    assert fp.shape == (3, 2)
