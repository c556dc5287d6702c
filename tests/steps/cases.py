"""Inputs the ``steps`` tests share: a tiny 2-site model, random allocations, tolerances."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ptq_adversary import models

CHOICES = (2, 3, 4, 5, 6, 8)
# Chunked and full vmaps run convolutions of different batch sizes, which XLA:CPU may sum in
# a different order: equal up to float32 rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-5


@functools.cache
def tiny_cnn():
    """``(model, graphdef, params, rest, images [3, 10, 10, 1])`` of a 2-site cnn (shared)."""
    model = models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(0), widths=(4, 8), strides=(1, 2)
    )  # 2 sites: conv2 and head; small, so the steps compile in seconds
    graphdef, params, rest = models.split_model(model)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 10, 10, 1))
    return model, graphdef, params, rest, images


def random_bits(num_policies, batch, num_sites, seed=0):
    """int32 ``[P, B, L]`` bit-widths drawn from :data:`CHOICES`."""
    idx = jax.random.randint(jax.random.PRNGKey(seed), (num_policies, batch, num_sites), 0, 6)
    return jnp.asarray(CHOICES, jnp.int32)[idx]
