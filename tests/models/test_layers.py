"""``ptq_adversary.models.layers``: the layer constructors and blocks."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ptq_adversary.models import layers
from tests.models.cases import rngs


def _randomize(model, seed):
    """Random values for every Variable (positive BatchNorm variances), so that BatchNorm's
    scale, bias and running statistics are all exercised. NumPy draws them: no compile per
    shape."""
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            value = np.asarray(node.get_value())
            if path[-1] == "var":
                value = rng.uniform(0.5, 1.5, value.shape)
            elif path[-1] == "kernel":
                value = value * rng.uniform(0.5, 1.5, value.shape)
            else:
                value = 0.3 * rng.standard_normal(value.shape)
            node.set_value(jnp.asarray(value, dtype=jnp.float32))


def test_conv_bn_matches_batch_norm_formula_in_both_modes():
    """The legacy BatchNorm semantics, spelled out: eval normalizes with the running statistics,
    train with the biased batch statistics over (B, H, W) and then moves the running averages
    by momentum 0.9; epsilon 1e-5."""
    block = layers.ConvBN(3, 4, 3, strides=2, rngs=rngs(0))
    _randomize(block, seed=7)
    x = jax.random.normal(jax.random.key(5), (4, 9, 9, 3))
    bn = block.bn
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    y = np.asarray(block.conv(x), np.float64)
    assert y.shape == (4, 5, 5, 4)

    def formula(m, v):
        return np.maximum(scale * (y - m) / np.sqrt(v + 1e-5) + bias, 0.0)

    block.eval()
    np.testing.assert_allclose(block(x), formula(mean, var), rtol=1e-5, atol=1e-5)
    block.train()
    batch_mean, batch_var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    np.testing.assert_allclose(block(x), formula(batch_mean, batch_var), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], 0.9 * mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 * var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)


def test_conv_pads_symmetrically_and_scale_widths_rounds():
    c = layers.conv(2, 3, 3, strides=2, rngs=rngs(0))
    assert c.padding == ((1, 1), (1, 1)) and c.strides == (2, 2) and c.bias is None
    assert layers.conv(2, 3, 5, rngs=rngs(0)).padding == ((2, 2), (2, 2))
    assert layers.scale_widths((16, 32, 64), 0.25) == (4, 8, 16)
    assert layers.scale_widths((16, 3), 0.1) == (2, 1)  # rounded, at least one channel
