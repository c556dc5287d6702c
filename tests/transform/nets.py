"""The small networks the transform tests share, and their hand-written quantized pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from ptq_adversary import quant

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


def linen():
    """``(module, variables, x)``: a :class:`LinenCNN` with non-trivial running statistics and
    ``x`` ``[5, 8, 8, 1]``."""
    module = LinenCNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    # non-trivial running statistics, so BatchNorm in inference mode is not the identity
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return module, {**variables, **updates}, x


def hand_written(variables, x, bits, weight_bits=8):
    """The same network written out with the quantizers inserted by hand (``bits`` ``[B, 3]``)."""
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


def random_bits(key, shape, lo=2, hi=9):
    """Random int bit-widths in ``[lo, hi)`` of ``shape`` from ``PRNGKey(key)``."""
    return jax.random.randint(jax.random.PRNGKey(key), shape, lo, hi)


class NNXNet(nnx.Module):
    """An NNX CNN with BatchNorm: 2 sites (conv2, head)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv1(x)))
        return self.head(jax.nn.relu(self.conv2(x)).mean((1, 2)))
