"""The Python examples in docs/*.md run as written and do what the pages say they do; every
relative link in the README and the docs points at a file in the repository."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import quant
from tests.helpers import REPO

DOCS = REPO / "docs"
DN = ("NHWC", "HWIO", "NHWC")


def _python_blocks(path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def _run(name: str) -> dict:
    path = DOCS / name
    blocks = _python_blocks(path)
    assert blocks, f"{name} has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


def _hand_written_nnx(net, x, bits):
    """LIBRARY.md's NNXNet with its quantizers written out by hand (BatchNorm: running stats)."""
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


def _check_library(ns: dict) -> None:
    # transform.quantize on a linen model: the sites, the shapes, integer mode.
    assert ns["qfn"].site_names == ("conv2", "head")
    assert ns["q_pbc"].shape == (16, 8, 10)
    np.testing.assert_allclose(ns["int_logits"], ns["q_logits"], rtol=1e-4, atol=1e-4)
    assert ns["bit_idx"].shape == (16, 2)
    assert (np.asarray(ns["bits_pbl"]).sum(axis=-1) == 8).all()  # 4 mean bits over 2 sites
    # The plain-NNX model: quantized logits equal a hand-written quantized pass.
    net, x, bits = ns["net"], ns["x"], ns["bits_bl"]
    assert ns["model"].site_names == ("conv2", "head")
    x = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    bits = jnp.asarray(np.random.default_rng(0).choice([2, 3, 5, 8], size=bits.shape), jnp.int32)
    models, g, p, r = ns["models"], ns["graphdef"], ns["params"], ns["rest"]
    got = jax.jit(lambda x, b: models.apply_model(g, p, r, x, b, branches=1)[0])(x, bits)
    net.eval()
    want = jax.jit(lambda x, b: _hand_written_nnx(net, x, b))(x, bits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # The budget: 109 allocations of the default student, the uniform one 4/4/4/4.
    assert ns["allocations"].shape == (109, 4)
    assert len({tuple(a) for a in ns["allocations"]}) == 109


def _check_audit(ns: dict) -> None:
    result, methods = ns["result"], ns["methods"]
    assert result.site_names == ("conv2", "head")
    exact = methods["exhaustive"]["accuracy"]
    certify = methods["certify"]
    assert certify["exact"] and certify["certified_accuracy"] == certify["accuracy"] == exact
    for name in ("uniform", "random_search", "greedy", "beam"):
        assert methods[name]["accuracy"] >= exact, name  # searches: upper bounds
    # ranking: vulnerable examples first, and their breaking allocations do break them.
    worst = ns["worst"]
    assert result.vulnerable[worst[0]] or not result.vulnerable.any()
    assert (result.breaking_bits[worst].sum(axis=1) == 8).all()  # budget 4 over 2 sites
    np.testing.assert_array_equal(np.asarray(ns["starts"]), [[2, 6], [6, 2]])


def _check_certify(ns: dict) -> None:
    c = ns["c"]
    assert c["exact"] and c["certified_accuracy"] == c["accuracy"]
    assert c["states"]["unknown"] == 0
    assert sum(c["states"].values()) == len(ns["labels"]) == len(c["state"])
    assert c["certified_accuracy"] == np.mean(np.asarray(c["state"]) == "certified")


def _check_method(ns: dict) -> None:
    assert ns["activation_error"] < 1e-6 and ns["weight_error"] < 1e-6


CHECKS = {
    "LIBRARY.md": _check_library,
    "AUDIT.md": _check_audit,
    "CERTIFY.md": _check_certify,
    "METHOD.md": _check_method,
}


def test_every_docs_page_with_python_has_checks():
    with_python = {p.name for p in DOCS.glob("*.md") if _python_blocks(p)}
    assert with_python == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_docs_python_examples_run(name):
    CHECKS[name](_run(name))


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_point_into_the_repository():
    pages = [REPO / "README.md", REPO / "experiments" / "README.md", *sorted(DOCS.glob("*.md"))]
    bad = []
    for page in pages:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if REPO.resolve() not in path.parents or not path.exists():
                bad.append(f"{page.relative_to(REPO)}: {target}")
    assert not bad, bad
