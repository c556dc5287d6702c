"""Tiny registry models the ``models`` tests share, cached with their jitted forward passes.

Models and jitted forwards are cached across tests: on 2 CPU cores, eager initialization and
XLA compilation (seconds for a quantized ResNet) dominate, not running the tiny models.
"""

import functools

import jax
import numpy as np
from flax import nnx

from ptq_adversary import models


def rngs(seed=0):
    """``nnx.Rngs`` on an "rbg" key.

    The "rbg" PRNG compiles ~3x faster than threefry for every new parameter shape; on 2 CPU
    cores that compile, not the math, dominates building the tiny test models.
    """
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


#: Tiny versions of every registry model: (kwargs, in_channels, spatial size, expected sites).
TINY = {
    "cnn": (dict(widths=(2, 3, 4, 4)), 1, 8, 4),
    "teacher_cnn": (dict(widths=(2, 3, 4, 4), hidden=5), 1, 8, 5),
    # 8 basic blocks x 2 convs + 3 projection shortcuts + head.
    "resnet18": (dict(width=1 / 16), 3, 8, 8 * 2 + 3 + 1),
    # 9 basic blocks x 2 convs + 2 projection shortcuts + head.
    "resnet20": (dict(width=0.25), 3, 8, 9 * 2 + 2 + 1),
    # 6 pre-act blocks x 2 convs + 3 projection shortcuts (16 -> 64 channels too) + head.
    "wrn16_4": (dict(width=1 / 16), 3, 8, 6 * 2 + 3 + 1),
}


def build(name, weight_bits=8, seed=0):
    """A fresh tiny model (3 classes) and an input batch ``[2, H, W, C]``."""
    kwargs, c, hw, _ = TINY[name]
    model = models.create_model(
        name,
        num_classes=3,
        in_channels=c,
        image_size=hw,
        weight_bits=weight_bits,
        rngs=rngs(seed),
        **kwargs,
    )
    x = jax.random.normal(jax.random.key(seed + 1), (2, hw, hw, c))
    return model, x


@functools.cache
def tiny(name, weight_bits=8):
    """A shared tiny model and input batch ``[2, H, W, C]``; tests must not mutate the model."""
    return build(name, weight_bits)


@functools.cache
def tiny_forward(name, weight_bits=8, train=False, frozen_bn=False):
    """Jitted ``(x, bits=None) -> (logits, new_rest)`` of the cached tiny model."""
    g, p, r = models.split_model(tiny(name, weight_bits)[0])
    return jax.jit(
        lambda x, bits=None: models.apply_model(g, p, r, x, bits, train=train, frozen_bn=frozen_bn)
    )


def tiny_logits(name, x, bits=None, **kwargs):
    """The logits of :func:`tiny_forward` (``kwargs``: its mode flags and ``weight_bits``)."""
    return tiny_forward(name, **kwargs)(x, bits)[0]


def same_state(a, b):
    """Whether two pytrees of arrays are equal leaf by leaf."""
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
