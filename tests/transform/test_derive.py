"""transform.quantize: the programs and calls it refuses."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from ptq_adversary import transform
from tests.transform.nets import NNXNet, linen


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
    module, variables, x = linen()
    train = lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0]
    with pytest.raises(transform.TransformError, match="mixes examples"):
        transform.quantize(train, variables, x)
    model = NNXNet(nnx.Rngs(0))  # train mode: batch statistics
    graphdef, state = nnx.split(model)
    with pytest.raises(transform.TransformError, match=r"model\.eval\(\)"):
        transform.quantize(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


def test_bad_calls_are_rejected():
    module, variables, x = linen()
    with pytest.raises(TypeError, match="linen"):
        transform.quantize(module.apply, None, x)
    qfn = transform.quantize(module.apply, variables, x)
    with pytest.raises(ValueError, match=r"bits must be \[B, L\] = \[5, 3\]"):
        qfn(variables, x, jnp.full((5, 2), 4))
    with pytest.raises(TypeError, match="integer"):
        qfn(variables, x, jnp.full((5, 3), 4.0))
    with pytest.raises(ValueError, match="x must be"):
        qfn(variables, jnp.ones((5, 8, 8, 3)), jnp.full((5, 3), 4))
