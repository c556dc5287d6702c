"""``ptq_adversary.models.registry``: the built-in names, parameter counts, user factories."""

import pytest
from flax import nnx

from ptq_adversary import models
from tests.models.cases import TINY


def test_registry_names():
    assert set(models.MODELS) == set(TINY)


def _count(name, c, **kwargs):
    """Parameter count from shapes alone (nnx.eval_shape initializes nothing)."""
    model = nnx.eval_shape(
        lambda: models.create_model(name, num_classes=10, in_channels=c, rngs=nnx.Rngs(0), **kwargs)
    )
    return models.count_params(models.split_model(model)[1])


def _resnet_count(stage_sizes, widths, in_channels=3, num_classes=10):
    def block(c_in, c_out):  # two 3x3 convs + 2 BN, plus a 1x1 conv + BN when the shape changes
        n = 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out
        return n + (c_in * c_out + 2 * c_out if c_in != c_out else 0)

    n = 9 * in_channels * widths[0] + 2 * widths[0] + widths[-1] * num_classes + num_classes
    c_in = widths[0]
    for size, c in zip(stage_sizes, widths, strict=True):
        n += block(c_in, c) + (size - 1) * block(c, c)
        c_in = c
    return n


def test_default_param_counts_match_hand_counts():
    widths = (16, 32, 64, 64)
    convs = 9 * sum(a * b for a, b in zip((1, *widths[:-1]), widths, strict=True))
    assert _count("cnn", 1) == convs + 2 * sum(widths) + 64 * 10 + 10 == 61_050
    # The published CIFAR figures: ResNet-18 11,173,962; ResNet-20 (projection shortcuts) 272,474.
    assert _count("resnet18", 3) == _resnet_count((2, 2, 2, 2), (64, 128, 256, 512)) == 11_173_962
    assert _count("resnet20", 3) == _resnet_count((3, 3, 3), (16, 32, 64)) == 272_474
    assert _count("resnet18", 3, width=0.5) == _resnet_count((2, 2, 2, 2), (32, 64, 128, 256))
    assert 2.7e6 < _count("wrn16_4", 3) < 2.8e6  # "2.7M" in Zagoruyko & Komodakis, Table 1
    assert _count("teacher_cnn", 1) > 4 * _count("cnn", 1)


def test_create_model_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown model 'vgg'") as err:
        models.create_model("vgg", num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    for name in models.MODELS:
        assert name in str(err.value)


def test_load_factory_imports_a_user_constructor_and_rejects_bad_paths():
    assert models.load_factory("ptq_adversary.models.zoo:cnn") is models.zoo.cnn
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        models.load_factory("ptq_adversary.models.zoo.cnn")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        models.load_factory("no_such_module_xyz:build")
    with pytest.raises(ValueError, match="has no function 'vgg'"):
        models.load_factory("ptq_adversary.models.zoo:vgg")
