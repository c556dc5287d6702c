"""Property tests of the fake quantizers under fuzzing (hypothesis), in every accepted dtype.

Properties: finite in -> finite out; quantization error within half a step inside the range;
quantizing twice at the same bits changes nothing, in the precise sense documented in
:func:`test_requantizing_float32_changes_nothing`; the same for the weight quantizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptq_adversary import quant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FUZZ = settings(max_examples=60, deadline=None, derandomize=True)
SHAPE = (3, 16)  # [B, N]

fq_act = jax.jit(quant.fake_quant_activation)
codes_act = jax.jit(quant.quantize_activation)
fq_w = jax.jit(quant.fake_quant_weight)


def _finite_of(dtype) -> st.SearchStrategy[float]:
    info = jnp.finfo(dtype)
    return st.floats(
        min_value=-float(info.max), max_value=float(info.max), allow_nan=False, width=32
    )


@st.composite
def activations(draw, dtype_name: str | None = None, max_magnitude: float | None = None):
    """``(x [B, N] in dtype, bits [B])``: finite values, mixed scales, extreme ones included."""
    name = dtype_name or draw(st.sampled_from(sorted(DTYPES)))
    dtype = DTYPES[name]
    elements = (
        _finite_of(dtype)
        if max_magnitude is None
        else st.floats(-max_magnitude, max_magnitude, allow_nan=False, width=32)
    )
    # One shape for every example: each new shape would cost a compilation.
    x = draw(hnp.arrays(np.float64, SHAPE, elements=elements))
    if max_magnitude is not None:
        x = x * draw(st.sampled_from([1.0, 1e-3, 1e3]))
    big = float(jnp.finfo(dtype).max)
    x = np.asarray(jnp.asarray(np.clip(x, -big, big).astype(np.float32), dtype))
    assume(np.all(np.isfinite(x.astype(np.float32))))  # the cast to bf16 can round up to inf
    bits = draw(hnp.arrays(np.int32, SHAPE[:1], elements=st.integers(2, 16)))
    return jnp.asarray(x, dtype), jnp.asarray(bits)


def _f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _range(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(range(1, x.ndim))
    return np.minimum(x.min(axis=axes), 0.0), np.maximum(x.max(axis=axes), 0.0)


def _ulp(dtype, magnitude: np.ndarray) -> np.ndarray:
    """The spacing of ``dtype`` at ``magnitude`` (at least its smallest normal spacing)."""
    info = jnp.finfo(dtype)
    tiny = float(info.tiny) * float(info.eps)
    exponent = np.floor(np.log2(np.maximum(magnitude, float(info.tiny))))
    return np.maximum(2.0**exponent * float(info.eps), tiny)


@FUZZ
@given(activations())
def test_finite_in_finite_out(case):
    x, bits = case
    out = fq_act(x, bits)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert np.all(np.isfinite(_f32(out)))
    grad = jax.grad(lambda v: fq_act(v, bits).astype(jnp.float32).sum())(x)
    assert np.all(np.isfinite(_f32(grad)))


@FUZZ
@given(activations() | activations(max_magnitude=1e4))
def test_error_within_half_a_step_inside_the_range(case):
    x, bits = case
    xf = _f32(x)
    lo, hi = _range(xf)
    step = (hi - lo) / (2.0 ** np.asarray(bits) - 1)
    err = np.abs(_f32(fq_act(x, bits)) - xf)
    # Half a step, plus the output dtype's rounding of the grid point (zero for float32 up to
    # float32 arithmetic): every value of x lies inside its own example's range.
    tol = step / 2 * (1 + 1e-5) + _ulp(x.dtype, np.maximum(np.abs(lo), np.abs(hi))) / 2
    assert np.all(err <= tol[:, None] + 1e-30), (err.max(axis=1), tol)


@FUZZ
@example(
    case=(jnp.asarray([[-1.0, 0.3, 2.0]], jnp.float32), jnp.asarray([2]))
)  # lo=-1, hi=2, s=1: an exactly representable grid
@given(activations("float32", max_magnitude=1e4))
def test_requantizing_float32_changes_nothing(case):
    """Quantizing twice at the same bits gives the same codes and values.

    Precisely: when the first pass uses its top code ``2^b - 1`` (it does except on a rounding
    tie, see :func:`test_requantizing_a_tie_narrows_the_grid`), the second pass reproduces
    its integer codes and zero point exactly, and its values up to the float32 rounding of the
    recomputed scale (a few ulps of the range): the requantized range ``[-s z, s (n - z)]`` is
    shifted against ``[lo, hi]`` by the rounded zero point but has the same width ``n s``.
    """
    x, bits = case
    q1, s1, z1 = codes_act(x, bits)
    n = 2.0 ** np.asarray(bits) - 1
    assume(np.all((np.asarray(q1).max(axis=1) == n) | (np.asarray(s1) == 0)))
    once = fq_act(x, bits)
    q2, s2, z2 = codes_act(once, bits)
    np.testing.assert_array_equal(q2, q1)
    np.testing.assert_array_equal(z2, z1)
    twice = fq_act(once, bits)
    lo, hi = _range(_f32(x))
    tol = 8 * np.finfo(np.float32).eps * (hi - lo)
    assert np.all(np.abs(_f32(twice) - _f32(once)) <= tol[:, None])


@FUZZ
@given(activations("bfloat16", max_magnitude=1e4) | activations("float16", max_magnitude=1e4))
def test_requantizing_low_precision_moves_values_by_at_most_the_dtype_rounding(case):
    """In bfloat16/float16 the grid points themselves are rounded to the dtype (8 and 11
    significant bits), so the second pass sees a slightly different range. With a grid coarser
    than the dtype (a step spans several ulps) and away from the dtype's overflow limit, the
    second pass moves no value by more than twice the dtype's rounding at the range's ends."""
    x, bits = case
    once = fq_act(x, bits)
    twice = fq_act(once, bits)
    q1 = np.asarray(codes_act(x, bits)[0])
    n = 2.0 ** np.asarray(bits) - 1
    lo, hi = _range(_f32(once))
    ulp = _ulp(x.dtype, np.maximum(np.abs(lo), np.abs(hi)))
    coarse = (hi - lo) / n >= 4 * ulp  # a step spans several dtype ulps
    # Away from the overflow limit, where the grid (up to half a step past the range) is clipped.
    inside = np.maximum(np.abs(lo), np.abs(hi)) < float(jnp.finfo(x.dtype).max) / 4
    rows = coarse & inside & (q1.max(axis=1) == n)
    assume(np.any(rows))
    diff = np.abs(_f32(twice) - _f32(once)).max(axis=1)
    assert np.all(diff[rows] <= 2 * ulp[rows]), (diff, ulp)


def test_requantizing_a_tie_narrows_the_grid():
    """The one way quantizing twice changes values: a tie in the rounded zero point.

    x = [-0.5, 1, 2.5] at 2 bits: s = 1, -lo/s = 0.5 rounds (half to even) to z = 0, so lo maps
    to 0 and hi = 2.5 to round(2.5) = 2: the top code 3 stays unused, the output range is
    [0, 2] and a second pass quantizes with s = 2/3, moving 1 to 4/3. PyTorch's
    fake_quantize_per_tensor_affine (which we match bit for bit) does the same; it is the
    convention's, not a bug of this implementation.
    """
    x = jnp.asarray([[-0.5, 1.0, 2.5]], jnp.float32)
    once = fq_act(x, jnp.asarray([2]))
    np.testing.assert_array_equal(once, [[0.0, 1.0, 2.0]])
    twice = fq_act(once, jnp.asarray([2]))
    np.testing.assert_allclose(twice, [[0.0, 4 / 3, 2.0]], rtol=1e-6)


def test_requantizing_a_tie_matches_pytorch():
    torch = pytest.importorskip("torch")

    def torch_fq(v: np.ndarray, bits: int) -> np.ndarray:
        lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
        scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(2**bits - 1))
        zero_point = int(np.round(-np.float32(lo) * (np.float32(1) / scale)))
        out = torch.fake_quantize_per_tensor_affine(
            torch.from_numpy(v), float(scale), zero_point, 0, 2**bits - 1
        )
        return out.numpy()

    x = np.asarray([-0.5, 1.0, 2.5], np.float32)
    once = torch_fq(x, 2)
    np.testing.assert_allclose(torch_fq(once, 2), [0.0, 4 / 3, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fq_act(jnp.asarray(x[None]), 2))[0], once)


# ------------------------------------------------------------------------------------ weights
@st.composite
def weights(draw):
    name = draw(st.sampled_from(sorted(DTYPES)))
    dtype = DTYPES[name]
    w = draw(hnp.arrays(np.float32, (3, 4, 5), elements=_finite_of(dtype)))
    w = np.asarray(jnp.asarray(w, dtype))
    assume(np.all(np.isfinite(w.astype(np.float32))))
    return jnp.asarray(w, dtype), jnp.asarray(draw(st.integers(2, 16)), jnp.int32)


@FUZZ
@given(weights())
def test_weights_finite_within_half_a_step_and_requantize_to_themselves(case):
    w, bits = case
    once = fq_w(w, bits)
    wf, of = _f32(w), _f32(once)
    assert once.dtype == w.dtype and np.all(np.isfinite(of))
    qmax = 2.0 ** (int(bits) - 1) - 1
    top = np.abs(wf).max(axis=(0, 1))  # per output channel
    step = top / qmax
    tol = step / 2 * (1 + 1e-5) + _ulp(w.dtype, top) / 2
    assert np.all(np.abs(of - wf) <= tol + 1e-30)
    # max|w| maps to the top code exactly, so a second pass keeps the scale (up to rounding).
    twice = _f32(fq_w(once, bits))
    assert np.all(np.abs(twice - of) <= 2 * _ulp(w.dtype, top) + 1e-30)
