"""``ptq_adversary.models.functional``: ``apply_model``'s numerics, modes, vmaps and branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import backend, models
from ptq_adversary.quant import fake_quant_activation, fake_quant_weight
from tests.models.cases import TINY, build, rngs, same_state, tiny, tiny_forward, tiny_logits

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
    model, x = build("cnn", seed=5)  # its own copy: the BatchNorm state gets overwritten
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
    model, x = tiny("cnn", weight_bits=None)
    fp = tiny_logits("cnn", x, weight_bits=None)

    def rel_err(b):
        q = tiny_logits("cnn", x, jnp.full((2, model.num_sites), b, jnp.int32), weight_bits=None)
        return float(jnp.linalg.norm(q - fp) / jnp.linalg.norm(fp))

    e16, e8, e2 = rel_err(16), rel_err(8), rel_err(2)
    assert e16 < 1e-3
    assert e8 < 0.05
    assert e2 > 0.1
    assert e16 < e8 < e2


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_each_site_moves_the_output_through_its_own_bits(name):
    model, x = tiny(name)
    base_bits = jnp.full((2, model.num_sites), 8, jnp.int32)
    base = tiny_logits(name, x, base_bits)
    np.testing.assert_array_equal(tiny_logits(name, x, base_bits), base)  # deterministic
    for i, site in enumerate(model.site_names):
        changed = tiny_logits(name, x, base_bits.at[:, i].set(2))
        assert not np.allclose(changed, base, atol=1e-5), site


# --- bits are data: vmap, one compile -----------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_vmap_over_policies_equals_loop(name):
    model, x = tiny(name)
    g, p, r = models.split_model(model)
    bits_pbl = jax.random.randint(jax.random.key(7), (3, 2, model.num_sites), 2, 9)
    looped = jnp.stack([tiny_logits(name, x, b) for b in bits_pbl])
    vmapped = jax.jit(
        jax.vmap(models.apply_model, in_axes=(None, None, None, None, 0)), static_argnums=0
    )(g, p, r, x, bits_pbl)[0]
    assert vmapped.shape == (3, 2, 3)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6, atol=1e-6)
    assert not np.allclose(looped[0], looped[1], atol=1e-5)


def test_different_bit_values_compile_once():
    model, x = tiny("cnn")
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
    model, _ = tiny(name)
    kwargs, c, hw, _ = TINY[name]
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
    model, x = tiny("cnn")
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
    model, x = tiny(name)
    r = models.split_model(model)[2]
    assert jax.tree.leaves(r), "the model should carry BatchNorm statistics"
    assert not same_state(r, tiny_forward(name, train=True)(x)[1])
    assert same_state(r, tiny_forward(name, train=True, frozen_bn=True)(x)[1])
    assert same_state(r, tiny_forward(name)(x)[1])
    if name == "cnn":  # quantized passes run on running statistics only
        bits = jnp.full((2, model.num_sites), 4, jnp.int32)
        assert same_state(r, tiny_forward(name, train=True, frozen_bn=True)(x, bits)[1])
        with pytest.raises(ValueError, match="frozen_bn=True"):
            tiny_forward(name, train=True)(x, bits)


def test_apply_model_does_not_mutate_its_inputs():
    # A lone BatchNorm keeps this eager call cheap; the merge/split path is the same as a model's.
    bn = nnx.BatchNorm(3, rngs=rngs())
    g, p, r = models.split_model(models.QuantizedModel(bn, input_shape=(3,)))
    before = [np.array(v) for v in jax.tree.leaves(r)]
    x = jnp.arange(12.0).reshape(4, 3)
    _, new_r = models.apply_model(g, p, r, x, train=True)  # eagerly: NNX would mutate in place
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(r), strict=True))
    assert not same_state(r, new_r)


@pytest.mark.parametrize(
    ("name", "flags"),
    [("cnn", {}), ("cnn", dict(train=True, frozen_bn=True)), ("resnet20", {})],
)
def test_per_example_independence_with_running_stats(name, flags):
    model, x = tiny(name)
    other = x.at[1].set(10.0 * jax.random.normal(jax.random.key(9), x.shape[1:]))
    bits = jnp.array([[3] * model.num_sites, [8] * model.num_sites], jnp.int32)
    other_bits = bits.at[1].set(2)
    np.testing.assert_array_equal(
        tiny_logits(name, x, **flags)[0], tiny_logits(name, other, **flags)[0]
    )
    np.testing.assert_array_equal(
        tiny_logits(name, x, bits, **flags)[0], tiny_logits(name, other, other_bits, **flags)[0]
    )


def test_batch_statistics_couple_examples_in_train_mode():
    # The converse of the test above, so that test could fail.
    _, x = tiny("cnn")
    other = x.at[1].set(10.0 * jax.random.normal(jax.random.key(9), x.shape[1:]))
    assert not np.allclose(
        tiny_logits("cnn", x, train=True)[0], tiny_logits("cnn", other, train=True)[0]
    )


@pytest.mark.parametrize("name", ["cnn"])
def test_qat_gradients_reach_every_parameter(name):
    model, x = tiny(name)
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
