"""``ptq_adversary.models.quantized``: the sites a model's program gives, and its cache."""

import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import models
from tests.models.cases import TINY, build, tiny, tiny_logits


@pytest.mark.parametrize("name", sorted(TINY))
def test_registry_model_shapes_and_sites(name):
    model, x = tiny(name)
    expected_sites = TINY[name][3]
    assert model.num_sites == expected_sites == len(model.site_names)
    assert len(set(model.site_names)) == model.num_sites
    assert model.site_names[-1] == "head"
    bits = jnp.full((2, model.num_sites), 4, jnp.int32)
    fp, q = tiny_logits(name, x), tiny_logits(name, x, bits)
    assert fp.shape == q.shape == (2, 3)
    assert np.all(np.isfinite(fp)) and np.all(np.isfinite(q))
    assert not np.allclose(fp, q, atol=1e-5)
    with pytest.raises(ValueError, match=r"bits must be \[B, L\]"):
        tiny_logits(name, x, bits[:, 1:])


def test_site_names_in_forward_order():
    # Derived from the program: the module path of each conv/dense weight, in program order.
    assert tiny("cnn")[0].site_names == ("conv2", "conv3", "conv4", "head")
    assert tiny("teacher_cnn")[0].site_names == ("conv2", "conv3", "conv4", "fc", "head")
    r18 = tiny("resnet18")[0].site_names
    assert r18[:7] == (
        "layer1/0/conv1",
        "layer1/0/conv2",
        "layer1/1/conv1",
        "layer1/1/conv2",
        "layer2/0/conv1",
        "layer2/0/conv2",
        "layer2/0/shortcut",
    )
    assert [n for n in r18 if "shortcut" in n] == [f"layer{i}/0/shortcut" for i in (2, 3, 4)]
    r20 = tiny("resnet20")[0].site_names
    assert [n for n in r20 if "shortcut" in n] == ["layer2/0/shortcut", "layer3/0/shortcut"]
    assert r20[-2] == "layer3/2/conv2"
    sites = tiny("cnn")[0].sites
    assert [s.op for s in sites] == ["conv", "conv", "conv", "dense"]
    assert sites[0].data_shape == (1, 8, 8, 2) and sites[0].weight_shape == (3, 3, 2, 3)


def test_the_transformed_program_is_cached_by_structure_and_shapes():
    model, _ = build("cnn", seed=11)  # its own model: the cache is keyed by its structure
    models.clear_quantize_cache()
    info = models.quantize_cache_info()
    assert info.currsize == 0 and info.maxsize == 64
    first = model.quantized_fn()
    assert models.quantize_cache_info().misses == info.misses + 1
    assert model.quantized_fn() is first  # a hit: no second transformation
    assert models.quantize_cache_info().hits == info.hits + 1
    assert model.program((8, 8, 1))[0] is first  # the same shape, named explicitly
    other = model.program((12, 12, 1))[0]  # another input shape: another program
    assert other is not first and models.quantize_cache_info().currsize == 2
    models.clear_quantize_cache()
    assert models.quantize_cache_info().currsize == 0
    assert model.quantized_fn() is not first
