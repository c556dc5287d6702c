"""Tests for the model zoo, its registry and the functional boundary in ptq_adversary.models."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import backend, models
from ptq_adversary.quant import fake_quant_activation, fake_quant_weight


def _rngs(seed=0):
    # The "rbg" PRNG compiles ~3x faster than threefry for every new parameter shape; on 2 CPU
    # cores that compile, not the math, dominates building the tiny test models.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# Tiny versions of every registry model: (kwargs, in_channels, spatial size, expected sites).
_TINY = {
    "cnn": (dict(widths=(2, 3, 4, 4)), 1, 8, 4),
    "teacher_cnn": (dict(widths=(2, 3, 4, 4), hidden=5), 1, 8, 5),
    # 8 basic blocks x 2 convs + 3 projection shortcuts + head.
    "resnet18": (dict(width=1 / 16), 3, 8, 8 * 2 + 3 + 1),
    # 9 basic blocks x 2 convs + 2 projection shortcuts + head.
    "resnet20": (dict(width=0.25), 3, 8, 9 * 2 + 2 + 1),
    # 6 pre-act blocks x 2 convs + 3 projection shortcuts (16 -> 64 channels too) + head.
    "wrn16_4": (dict(width=1 / 16), 3, 8, 6 * 2 + 3 + 1),
}


def _build(name, weight_bits=8, seed=0):
    kwargs, c, hw, _ = _TINY[name]
    model = models.create_model(
        name,
        num_classes=3,
        in_channels=c,
        image_size=hw,
        weight_bits=weight_bits,
        rngs=_rngs(seed),
        **kwargs,
    )
    x = jax.random.normal(jax.random.key(seed + 1), (2, hw, hw, c))
    return model, x


# Models and jitted forwards are cached across tests: on 2 CPU cores, eager initialization and
# XLA compilation (seconds for a quantized ResNet) dominate, not running the tiny models.
@functools.cache
def _tiny(name, weight_bits=8):
    """A shared tiny model and input batch ``[2, H, W, C]``; tests must not mutate the model."""
    return _build(name, weight_bits)


@functools.cache
def _forward(name, weight_bits=8, train=False, frozen_bn=False):
    """Jitted ``(x, bits=None) -> (logits, new_rest)`` of the cached tiny model."""
    g, p, r = models.split_model(_tiny(name, weight_bits)[0])
    return jax.jit(
        lambda x, bits=None: models.apply_model(g, p, r, x, bits, train=train, frozen_bn=frozen_bn)
    )


def _logits(name, x, bits=None, **kwargs):
    return _forward(name, **kwargs)(x, bits)[0]


def _same_state(a, b):
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_registry_names():
    assert set(models.MODELS) == set(_TINY)


@pytest.mark.parametrize("name", sorted(_TINY))
def test_registry_model_shapes_and_sites(name):
    model, x = _tiny(name)
    expected_sites = _TINY[name][3]
    assert model.num_sites == expected_sites == len(model.site_names)
    assert len(set(model.site_names)) == model.num_sites
    assert model.site_names[-1] == "head"
    bits = jnp.full((2, model.num_sites), 4, jnp.int32)
    fp, q = _logits(name, x), _logits(name, x, bits)
    assert fp.shape == q.shape == (2, 3)
    assert np.all(np.isfinite(fp)) and np.all(np.isfinite(q))
    assert not np.allclose(fp, q, atol=1e-5)
    with pytest.raises(ValueError, match=r"bits must be \[B, L\]"):
        _logits(name, x, bits[:, 1:])


def test_site_names_in_forward_order():
    # Derived from the program: the module path of each conv/dense weight, in program order.
    assert _tiny("cnn")[0].site_names == ("conv2", "conv3", "conv4", "head")
    assert _tiny("teacher_cnn")[0].site_names == ("conv2", "conv3", "conv4", "fc", "head")
    r18 = _tiny("resnet18")[0].site_names
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
    r20 = _tiny("resnet20")[0].site_names
    assert [n for n in r20 if "shortcut" in n] == ["layer2/0/shortcut", "layer3/0/shortcut"]
    assert r20[-2] == "layer3/2/conv2"
    sites = _tiny("cnn")[0].sites
    assert [s.op for s in sites] == ["conv", "conv", "conv", "dense"]
    assert sites[0].data_shape == (1, 8, 8, 2) and sites[0].weight_shape == (3, 3, 2, 3)


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


# --- numerics against a hand-written forward ----------------------------------------------------


def _hand_cnn(model, x, bits=None):
    """The tiny cnn written out by hand: convs 1..4 (conv1 reads the image), pool, head."""
    net = model.net
    y = x
    for i in range(4):
        conv, bn = getattr(net, f"conv{i + 1}"), getattr(net, f"bn{i + 1}")
        k = conv.kernel[...]
        if bits is not None:
            if i > 0:
                y = fake_quant_activation(y, bits[:, i - 1])
            k = fake_quant_weight(k, 8)
        y = jax.lax.conv_general_dilated(
            y, k, conv.strides, ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = (y - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * bn.scale[...] + bn.bias[...]
        y = jax.nn.relu(y)
    y = jnp.mean(y, axis=(1, 2))
    k = net.head.kernel[...]
    if bits is not None:
        y = fake_quant_activation(y, bits[:, -1])
        k = fake_quant_weight(k, 8)
    return y @ k + net.head.bias[...]


def _randomize_batchnorm(model, seed):
    """Non-trivial running statistics and affine parameters, so BN is really tested."""
    key = jax.random.key(seed)
    for i in range(4):
        bn = getattr(model.net, f"bn{i + 1}")
        key, *ks = jax.random.split(key, 5)
        n = bn.mean.shape
        bn.mean[...] = 0.3 * jax.random.normal(ks[0], n)
        bn.var[...] = jax.random.uniform(ks[1], n, minval=0.5, maxval=2.0)
        bn.scale[...] = jax.random.uniform(ks[2], n, minval=0.5, maxval=1.5)
        bn.bias[...] = 0.2 * jax.random.normal(ks[3], n)


def test_cnn_matches_hand_forward_full_precision_and_quantized():
    model, x = _build("cnn", seed=5)  # its own copy: the BatchNorm state gets overwritten
    _randomize_batchnorm(model, 3)
    g, p, r = models.split_model(model)
    bits = jnp.array([[2, 3, 4, 5], [8, 6, 2, 3]], jnp.int32)

    @jax.jit
    def both(x, bits):
        fp = models.apply_model(g, p, r, x)[0]
        q = models.apply_model(g, p, r, x, bits)[0]
        return fp, q

    fp, q = both(x, bits)
    hand_fp, hand_q = jax.jit(lambda x, bits: (_hand_cnn(model, x), _hand_cnn(model, x, bits)))(
        x, bits
    )
    # (nnx.BatchNorm multiplies by rsqrt(var + eps): equal up to float rounding)
    np.testing.assert_allclose(fp, hand_fp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q, hand_q, rtol=1e-4, atol=1e-5)


def test_quantized_forward_approaches_full_precision_with_more_bits():
    model, x = _tiny("cnn", weight_bits=None)
    fp = _logits("cnn", x, weight_bits=None)

    def rel_err(b):
        q = _logits("cnn", x, jnp.full((2, model.num_sites), b, jnp.int32), weight_bits=None)
        return float(jnp.linalg.norm(q - fp) / jnp.linalg.norm(fp))

    e16, e8, e2 = rel_err(16), rel_err(8), rel_err(2)
    assert e16 < 1e-3
    assert e8 < 0.05
    assert e2 > 0.1
    assert e16 < e8 < e2


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_each_site_moves_the_output_through_its_own_bits(name):
    model, x = _tiny(name)
    base_bits = jnp.full((2, model.num_sites), 8, jnp.int32)
    base = _logits(name, x, base_bits)
    np.testing.assert_array_equal(_logits(name, x, base_bits), base)  # deterministic
    for i, site in enumerate(model.site_names):
        changed = _logits(name, x, base_bits.at[:, i].set(2))
        assert not np.allclose(changed, base, atol=1e-5), site


# --- bits are data: vmap, one compile -----------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_vmap_over_policies_equals_loop(name):
    model, x = _tiny(name)
    g, p, r = models.split_model(model)
    bits_pbl = jax.random.randint(jax.random.key(7), (3, 2, model.num_sites), 2, 9)
    looped = jnp.stack([_logits(name, x, b) for b in bits_pbl])
    vmapped = jax.jit(
        jax.vmap(models.apply_model, in_axes=(None, None, None, None, 0)), static_argnums=0
    )(g, p, r, x, bits_pbl)[0]
    assert vmapped.shape == (3, 2, 3)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6, atol=1e-6)
    assert not np.allclose(looped[0], looped[1], atol=1e-5)


def test_different_bit_values_compile_once():
    model, x = _tiny("cnn")
    g, p, r = models.split_model(model)
    traces = []

    @jax.jit
    def f(p, r, x, bits):
        traces.append(1)  # runs only while tracing
        return models.apply_model(g, p, r, x, bits)[0]

    outs = [f(p, r, x, jnp.full((2, model.num_sites), b, jnp.int32)) for b in (2, 4, 8, 16)]
    outs.append(f(p, r, x, jnp.array([[2, 3, 4, 5], [6, 8, 16, 2]], jnp.int32)))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[3], atol=1e-4)


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_batch_branches_equal_one_branch(name):
    model, _ = _tiny(name)
    kwargs, c, hw, _ = _TINY[name]
    g, p, r = models.split_model(model)
    x = jax.random.normal(jax.random.key(3), (12, hw, hw, c))
    bits = jax.random.randint(jax.random.key(4), (12, model.num_sites), 2, 9)
    fwd = jax.jit(
        lambda x, b, k: models.apply_model(g, p, r, x, b, branches=k)[0], static_argnums=2
    )
    one = fwd(x, bits, 1)
    # Equal and unequal parts (array_split). A convolution over fewer examples may pick another
    # kernel and round differently in the last bit, so: equal up to float rounding.
    for k in (2, 5, 6) if name == "cnn" else (3,):  # (a ResNet compiles slowly: one count)
        np.testing.assert_allclose(fwd(x, bits, k), one, rtol=1e-5, atol=1e-5)
    if name != "cnn":
        return
    # The same under a vmap over policies (the branches split each policy's batch).
    bits_pbl = jnp.stack([bits, jnp.flip(bits, 0)])
    vmapped = jax.jit(jax.vmap(lambda b: models.apply_model(g, p, r, x, b, branches=4)[0]))
    looped = jax.jit(jax.vmap(lambda b: models.apply_model(g, p, r, x, b, branches=1)[0]))
    np.testing.assert_allclose(vmapped(bits_pbl), looped(bits_pbl), rtol=1e-5, atol=1e-5)
    # Frozen-BN training passes (stage B) may branch too, and keep their gradients.
    grad = lambda k: jax.grad(
        lambda p: jnp.sum(
            models.apply_model(g, p, r, x, bits, train=True, frozen_bn=True, branches=k)[0]
        )
    )(p)
    # (Gradients sum over examples in another order: float32 accumulation differences.)
    for a, b in zip(jax.tree.leaves(grad(1)), jax.tree.leaves(grad(3)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_branches_default_and_validation():
    model, x = _tiny("cnn")
    g, p, r = models.split_model(model)
    # The automatic count: ~INFERENCE_BRANCH_EXAMPLES examples per branch, clipped.
    assert backend.inference_branches(128, "cpu") == min(
        backend.MAX_INFERENCE_BRANCHES, 128 // backend.INFERENCE_BRANCH_EXAMPLES["cpu"]
    )
    assert backend.inference_branches(backend.MIN_BRANCHED_BATCH - 1, "cpu") == 1
    assert backend.inference_branches(10**6, "cpu") == backend.MAX_INFERENCE_BRANCHES
    assert backend.inference_branches(128, "no-such-backend") == 1
    with pytest.raises(ValueError, match="batch statistics"):
        models.apply_model(g, p, r, x, train=True, branches=2)
    with pytest.raises(ValueError, match="branches must be >= 1"):
        models.apply_model(g, p, r, x, branches=0)
    # More branches than examples: one example per branch.
    bits = jnp.full((2, model.num_sites), 4, jnp.int32)
    out = models.apply_model(g, p, r, x, bits, branches=7)[0]
    assert out.shape == (2, 3)


# --- BatchNorm modes and per-example independence -----------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet20", "wrn16_4"])
def test_batch_stats_update_only_in_unfrozen_train_mode(name):
    model, x = _tiny(name)
    r = models.split_model(model)[2]
    assert jax.tree.leaves(r), "the model should carry BatchNorm statistics"
    assert not _same_state(r, _forward(name, train=True)(x)[1])
    assert _same_state(r, _forward(name, train=True, frozen_bn=True)(x)[1])
    assert _same_state(r, _forward(name)(x)[1])
    if name == "cnn":  # quantized passes run on running statistics only
        bits = jnp.full((2, model.num_sites), 4, jnp.int32)
        assert _same_state(r, _forward(name, train=True, frozen_bn=True)(x, bits)[1])
        with pytest.raises(ValueError, match="frozen_bn=True"):
            _forward(name, train=True)(x, bits)


def test_apply_model_does_not_mutate_its_inputs():
    # A lone BatchNorm keeps this eager call cheap; the merge/split path is the same as a model's.
    bn = nnx.BatchNorm(3, rngs=_rngs())
    g, p, r = models.split_model(models.QuantizedModel(bn, input_shape=(3,)))
    before = [np.array(v) for v in jax.tree.leaves(r)]
    x = jnp.arange(12.0).reshape(4, 3)
    _, new_r = models.apply_model(g, p, r, x, train=True)  # eagerly: NNX would mutate in place
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(r), strict=True))
    assert not _same_state(r, new_r)


@pytest.mark.parametrize(
    ("name", "flags"),
    [("cnn", {}), ("cnn", dict(train=True, frozen_bn=True)), ("resnet20", {})],
)
def test_per_example_independence_with_running_stats(name, flags):
    model, x = _tiny(name)
    other = x.at[1].set(10.0 * jax.random.normal(jax.random.key(9), x.shape[1:]))
    bits = jnp.array([[3] * model.num_sites, [8] * model.num_sites], jnp.int32)
    other_bits = bits.at[1].set(2)
    np.testing.assert_array_equal(_logits(name, x, **flags)[0], _logits(name, other, **flags)[0])
    np.testing.assert_array_equal(
        _logits(name, x, bits, **flags)[0], _logits(name, other, other_bits, **flags)[0]
    )


def test_batch_statistics_couple_examples_in_train_mode():
    # The converse of the test above, so that test could fail.
    _, x = _tiny("cnn")
    other = x.at[1].set(10.0 * jax.random.normal(jax.random.key(9), x.shape[1:]))
    assert not np.allclose(_logits("cnn", x, train=True)[0], _logits("cnn", other, train=True)[0])


@pytest.mark.parametrize("name", ["cnn"])
def test_qat_gradients_reach_every_parameter(name):
    model, x = _tiny(name)
    g, p, r = models.split_model(model)
    bits = jnp.full((2, model.num_sites), 3, jnp.int32)

    @jax.jit
    def loss(p):
        logits, _ = models.apply_model(g, p, r, x, bits, train=True, frozen_bn=True)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.grad(loss)(p)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), path
        assert np.any(leaf != 0), path


def test_artifact_save_replaces_atomically(tmp_path):
    from ptq_adversary import artifacts

    spec = artifacts.ModelSpec(name="cnn", num_classes=10, in_channels=1, weight_bits=8,
                               kwargs={"widths": (4, 4, 4, 4)})  # fmt: skip
    first = models.split_model(artifacts.build(spec, seed=0))
    second = models.split_model(artifacts.build(spec, seed=1))
    directory = str(tmp_path / "model")
    artifacts.save_model(directory, spec, first[1], first[2])
    artifacts.save_model(directory, spec, second[1], second[2])
    # One state directory is left, the one spec.json names, holding the second save.
    assert len([d for d in os.listdir(directory) if d.startswith("state")]) == 1
    loaded = artifacts.load_model(directory)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(second[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
