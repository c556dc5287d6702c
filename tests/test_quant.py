"""Exact numerics of the fake quantizers (ptq_adversary.quant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import quant

fq_act = jax.jit(quant.fake_quant_activation)
fq_w = jax.jit(quant.fake_quant_weight, static_argnames="channel_axis")


# ----------------------------------------------------------------------------------- activations
@pytest.mark.parametrize(
    "x, bits, expected",
    [
        # lo=-1, hi=2, s=1, z=1; round(0.5) is 0 (half to even), so 0.5 -> 0.
        ([-1.0, 0.0, 0.5, 2.0], 2, [-1.0, 0.0, 0.0, 2.0]),
        # lo=0 (range forced to contain 0), hi=1, s=1/3, z=0.
        ([0.1, 0.3, 0.7, 1.0], 2, [0.0, 1 / 3, 2 / 3, 1.0]),
        # lo=-6, hi=1, s=1, z=6; ties go to even: -3.5 -> -4 and -2.5 -> -2.
        ([-6.0, -3.5, -2.5, 1.0], 3, [-6.0, -4.0, -2.0, 1.0]),
        # positive-only data still gets a range from 0: lo=0, hi=3, 2 bits -> s=1.
        ([1.2, 2.6, 3.0], 2, [1.0, 3.0, 3.0]),
    ],
)
def test_activation_golden_values(x, bits, expected):
    out = fq_act(jnp.asarray([x], jnp.float32), jnp.asarray([bits]))
    np.testing.assert_allclose(np.asarray(out)[0], expected, rtol=1e-6, atol=1e-7)


def test_activation_codes_scale_and_zero_point():
    x = jnp.asarray([[-1.0, 0.0, 0.5, 2.0]])
    q, scale, zero_point = jax.jit(quant.quantize_activation)(x, jnp.asarray([2]))
    np.testing.assert_array_equal(q, [[0.0, 1.0, 1.0, 3.0]])
    np.testing.assert_allclose(scale, [1.0])
    np.testing.assert_array_equal(zero_point, [1.0])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_activation_has_at_most_2_pow_b_levels_and_uses_all(bits):
    x = jnp.linspace(-3.0, 5.0, 4096).reshape(1, 64, 64)
    out = np.asarray(fq_act(x, jnp.asarray([bits])))
    levels = np.unique(out)
    assert len(levels) == 2**bits  # a dense ramp hits every level
    assert 0.0 in levels  # zero is exactly representable
    # The zero point is rounded, so the grid is shifted by < 1 step against [lo, hi].
    step = 8.0 / (2**bits - 1)
    assert abs(out.min() - -3.0) <= step / 2 + 1e-6
    assert abs(out.max() - 5.0) <= step / 2 + 1e-6


def test_activation_error_within_half_a_step_and_shrinks_with_bits():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 7, 5)).astype(np.float32))
    errors = []
    for bits in range(2, 17):
        out = fq_act(x, jnp.full((6,), bits))
        lo = np.minimum(np.asarray(x).min(axis=(1, 2)), 0)
        hi = np.maximum(np.asarray(x).max(axis=(1, 2)), 0)
        step = (hi - lo) / (2**bits - 1)
        err = np.abs(np.asarray(out - x)).max(axis=(1, 2))
        assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7), bits
        errors.append(err.max())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_activation_is_idempotent():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32))
    bits = jnp.asarray([2, 4, 7])
    once = fq_act(x, bits)
    np.testing.assert_allclose(fq_act(once, bits), once, rtol=0, atol=1e-6)


def test_activation_per_example_independence_and_per_example_bits():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    bits = jnp.asarray([2, 3, 5, 8])
    batched = np.asarray(fq_act(jnp.asarray(x), bits))
    for i in range(4):
        alone = np.asarray(fq_act(jnp.asarray(x[i : i + 1]), bits[i : i + 1]))
        np.testing.assert_array_equal(batched[i], alone[0])
    # Replacing another example (with a much larger range) changes nothing for example 0.
    x2 = x.copy()
    x2[1] *= 100.0
    np.testing.assert_array_equal(np.asarray(fq_act(jnp.asarray(x2), bits))[0], batched[0])


def test_activation_scalar_bits_broadcast():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32))
    # Two compilations may fuse the arithmetic differently: equal up to float rounding.
    np.testing.assert_allclose(
        fq_act(x, jnp.asarray(4)), fq_act(x, jnp.full((3,), 4)), rtol=1e-6, atol=1e-7
    )


def test_activation_all_zero_example_unchanged_and_finite():
    x = jnp.asarray(
        [[0.0, 0.0, 0.0], [1e-30, -1e-30, 0.0], [3e38, -3e38, 1.0], [1e-39, -1e-39, 0.0]],
        jnp.float32,
    )
    out = fq_act(x, jnp.asarray([2, 8, 2, 16]))
    np.testing.assert_array_equal(out[0], x[0])
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.abs(np.asarray(out[2])) <= 3e38 * 1.01)
    grad = jax.grad(lambda v: fq_act(v, jnp.asarray([2, 8, 2, 16])).sum())(x)
    np.testing.assert_array_equal(grad, np.ones_like(x))


def test_activation_straight_through_gradient():
    x = jnp.asarray([[-1.0, 0.3, 0.5, 2.0]])
    grad = jax.grad(lambda v: (fq_act(v, jnp.asarray([2])) * jnp.arange(4.0)).sum())(x)
    np.testing.assert_array_equal(grad, [[0.0, 1.0, 2.0, 3.0]])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_activation_low_precision_dtypes(dtype):
    x32 = jnp.asarray(np.random.default_rng(4).normal(size=(2, 64)).astype(np.float32))
    x = x32.astype(dtype)
    out = fq_act(x, jnp.asarray([3, 16]))
    assert out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert len(np.unique(np.asarray(out[0], np.float32))) <= 8
    # At 16 bits the grid is finer than the dtype itself: the value survives to dtype precision.
    np.testing.assert_allclose(
        np.asarray(out[1], np.float32), np.asarray(x[1], np.float32), rtol=1e-2, atol=1e-2
    )


def test_activation_rejects_bad_bits():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="integer"):
        quant.fake_quant_activation(x, jnp.asarray([2.0, 3.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        quant.fake_quant_activation(x, jnp.asarray([2, 3, 4]))


def test_activation_matches_pytorch_per_example():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(5, 4, 6, 6)) * rng.uniform(0.1, 10, size=(5, 1, 1, 1))).astype(np.float32)
    x[2] = np.abs(x[2])  # an all-positive example: lo is clamped to 0
    bits = np.asarray([2, 3, 4, 6, 8])
    ours = np.asarray(fq_act(jnp.asarray(x), jnp.asarray(bits)))
    for i, b in enumerate(bits):
        lo, hi = min(x[i].min(), 0.0), max(x[i].max(), 0.0)
        scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(2**b - 1))
        zero_point = int(np.round(-np.float32(lo) * (np.float32(1) / scale)))
        ref = torch.fake_quantize_per_tensor_affine(
            torch.from_numpy(x[i]), float(scale), zero_point, 0, 2**b - 1
        ).numpy()
        np.testing.assert_array_equal(ours[i], ref)


# --------------------------------------------------------------------------- traced-bit behaviour
def test_different_bits_compile_once():
    traces = []

    @jax.jit
    def f(x, bits):
        traces.append(None)
        return quant.fake_quant_activation(x, bits)

    x = jnp.ones((4, 8)) * jnp.arange(8.0)
    outs = {b: np.asarray(f(x, jnp.full((4,), b, jnp.int32))) for b in (2, 3, 5, 8, 16)}
    assert len(traces) == 1
    assert len(np.unique(outs[2])) < len(np.unique(outs[3]))


def test_vmap_over_policy_axis_equals_loop():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5, 5)).astype(np.float32))
    bits_pb = jnp.asarray(rng.integers(2, 9, size=(7, 3)))
    vmapped = jax.jit(jax.vmap(quant.fake_quant_activation, in_axes=(None, 0)))(x, bits_pb)
    for p in range(7):
        np.testing.assert_array_equal(vmapped[p], fq_act(x, bits_pb[p]))


# ------------------------------------------------------------------------------------- weights
def test_weight_golden_values_per_channel():
    # Two output channels (last axis): max|w| = 1.5 and 0.4; 3 bits -> qmax = 3.
    w = jnp.asarray([[1.5, 0.1], [-0.6, -0.4], [0.25, 0.3]])
    out = fq_w(w, 3)
    s0, s1 = 0.5, 0.4 / 3
    expected = [[3 * s0, 1 * s1], [-1 * s0, -3 * s1], [0 * s0, 2 * s1]]  # 0.25/0.5 = 0.5 -> 0
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_weight_symmetric_levels_zero_channel_and_channel_axis():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    w[..., 2] = 0.0
    out = np.asarray(fq_w(jnp.asarray(w), 4))
    np.testing.assert_array_equal(out[..., 2], 0.0)
    for c in (0, 1, 3, 4):
        scale = np.abs(w[..., c]).max() / 7
        codes = out[..., c] / scale
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
        assert np.abs(codes).max() == pytest.approx(7, abs=1e-4)  # max|w| hits +-qmax
    # channel_axis=0 quantizes per row instead.
    w2 = jnp.asarray([[1.0, 0.49], [0.1, 0.02]])
    np.testing.assert_allclose(fq_w(w2, 2, channel_axis=0), [[1.0, 0.0], [0.1, 0.0]], rtol=1e-6)


def test_weight_straight_through_and_traced_bits():
    w = jnp.asarray([[0.3, -0.7], [0.2, 0.05]])
    grad = jax.grad(lambda v: (fq_w(v, 2) ** 2).sum() * 0 + fq_w(v, 2).sum())(w)
    np.testing.assert_array_equal(grad, np.ones_like(w))
    traced = jax.jit(quant.fake_quant_weight)(w, jnp.asarray(3))
    np.testing.assert_array_equal(traced, fq_w(w, 3))
    with pytest.raises(TypeError, match="integer scalar"):
        quant.fake_quant_weight(w, 3.0)
