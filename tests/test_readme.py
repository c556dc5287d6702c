"""The README's Python examples run as written, and do what the README says they do."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import quant
from tests.helpers import REPO

DN = ("NHWC", "HWIO", "NHWC")


def _hand_written_nnx(net, x, bits):
    """The README's NNXNet with its quantizers written out by hand (BatchNorm: running stats)."""
    wq = lambda w: quant.fake_quant_weight(w, 8)
    pad = "SAME"  # nnx.Conv default (asymmetric at stride 2)
    bn = net.bn
    h = jax.lax.conv_general_dilated(
        x, wq(net.conv1.kernel[...]), (1, 1), pad, dimension_numbers=DN
    )
    h = h + net.conv1.bias[...]
    inv = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    h = jax.nn.relu((h - bn.mean[...]) * (inv * bn.scale[...]) + bn.bias[...])
    h = quant.fake_quant_activation(h, bits[:, 0])
    h = jax.lax.conv_general_dilated(
        h, wq(net.conv2.kernel[...]), (2, 2), pad, dimension_numbers=DN
    )
    h = jax.nn.relu(h + net.conv2.bias[...]).mean(axis=(1, 2))
    return (
        quant.fake_quant_activation(h, bits[:, 1]) @ wq(net.head.kernel[...]) + net.head.bias[...]
    )


def test_readme_python_examples_run():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own docs)
    ns = namespace
    # The audit example: a linen model, sites derived from its program.
    assert ns["result"].site_names == ("conv2", "head")
    # The certify example: an exact bracket (2 sites, 5 allocations, no limits).
    bracket = ns["bracket"]
    assert bracket["exact"] and bracket["certified_accuracy"] == bracket["accuracy"]
    # The library example's shapes, and integer mode agreeing with fake quantization.
    assert ns["q_pbc"].shape == (16, 8, 10)
    np.testing.assert_allclose(ns["int_logits"], ns["q_logits"], rtol=1e-4, atol=1e-4)
    # The plain-NNX model: quantized logits equal a hand-written quantized pass.
    net, x, bits = ns["net"], ns["x"], ns["bits_bl"]
    x = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    bits = jnp.asarray(np.random.default_rng(0).choice([2, 3, 5, 8], size=bits.shape), jnp.int32)
    models, g, p, r = ns["models"], ns["graphdef"], ns["params"], ns["rest"]
    got = jax.jit(lambda x, b: models.apply_model(g, p, r, x, b, branches=1)[0])(x, bits)
    net.eval()
    want = jax.jit(lambda x, b: _hand_written_nnx(net, x, b))(x, bits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
