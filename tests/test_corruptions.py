"""Corruptions: identity at severity 0, monotone damage, range/shape/dtype, determinism."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import corruptions

NAMES = corruptions.names()
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "rotation", "translation")


def _images(n=6, h=28, w=28, c=1, seed=0) -> np.ndarray:
    """Fashion-MNIST-like float images in [0, 1]: textured objects on a black background."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, h, w, c), np.float32)
    for i in range(n):
        r0, c0 = rng.integers(2, h // 3), rng.integers(2, w // 3)
        r1, c1 = rng.integers(h // 2, h - 2), rng.integers(w // 2, w - 2)
        x[i, r0:r1, c0:c1] = rng.uniform(0.3, 0.9, size=(r1 - r0, c1 - c0, c))
    return np.round(x * 255) / 255  # on the uint8 grid, like real data


@pytest.fixture(scope="module")
def all_severities():
    """name -> float [6, N, H, W, C]: every severity in one jitted, vmapped call."""
    x = jnp.asarray(_images())
    key = jax.random.PRNGKey(0)
    out = {}
    for name in NAMES:
        f = jax.jit(jax.vmap(lambda s, n=name: corruptions.apply(n, key, x, s)))
        out[name] = np.asarray(f(jnp.arange(6)))
    return np.asarray(x), out


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity_and_damage_grows_with_severity(name, all_severities):
    x, outs = all_severities
    y = outs[name]
    np.testing.assert_array_equal(y[0], x)  # exactly, not approximately
    assert y.dtype == np.float32 and y.shape[1:] == x.shape
    assert y.min() >= 0.0 and y.max() <= 1.0
    mad = np.abs(y - x[None]).mean(axis=(1, 2, 3, 4))
    assert np.all(np.diff(mad) > 0), (name, mad)  # strictly more damage at every step


@pytest.mark.parametrize("name", NAMES)
def test_rgb_non_square_shapes_dtype_and_range(name):
    x = jnp.asarray(_images(n=2, h=13, w=20, c=3, seed=1))
    y = corruptions.apply(name, jax.random.PRNGKey(1), x, 5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    np.testing.assert_array_equal(corruptions.apply(name, jax.random.PRNGKey(1), x, 0), x)


# shot_noise is random too; left out here only because its Poisson sampler is slow to compile.
@pytest.mark.parametrize("name", [n for n in RANDOM if n != "shot_noise"])
def test_deterministic_given_the_key(name):
    x = jnp.asarray(_images(n=3))
    a = corruptions.apply(name, jax.random.PRNGKey(3), x, 3)
    b = corruptions.apply(name, jax.random.PRNGKey(3), x, 3)
    c = corruptions.apply(name, jax.random.PRNGKey(4), x, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_compile_serves_every_severity():
    traces = []

    def f(x, s):
        traces.append(None)
        return corruptions.apply("contrast", jax.random.PRNGKey(0), x, s)

    jf = jax.jit(f)
    x = jnp.asarray(_images(n=2))
    for s in range(6):
        jf(x, jnp.int32(s))
    assert len(traces) == 1


def test_blur_and_pixelate_keep_constant_images_and_average_blocks():
    const = jnp.full((1, 10, 12, 1), 0.4, jnp.float32)
    for name in ("gaussian_blur", "defocus_blur", "pixelate"):
        np.testing.assert_allclose(corruptions.apply(name, None, const, 5), const, atol=1e-6)
    x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1) / 16
    # Severity 2 of pixelate is 2x2 blocks: each pixel becomes its block's mean.
    y = np.asarray(corruptions.apply("pixelate", None, x, 2))[0, :, :, 0]
    block = np.asarray(x)[0, :2, :2, 0].mean()
    np.testing.assert_allclose(y[:2, :2], block, rtol=1e-6)


def test_contrast_and_brightness_formulas():
    x = jnp.asarray(_images(n=2))
    mean = np.asarray(x).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(corruptions.apply("contrast", None, x, 2),
                               (np.asarray(x) - mean) * 0.5 + mean, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(corruptions.apply("brightness", None, x, 1),
                               np.clip(np.asarray(x) + 0.1, 0, 1), atol=1e-6)  # fmt: skip


def test_jpeg_is_close_to_pillows_baseline_jpeg():
    from PIL import Image

    x = _images(n=4)
    quality = corruptions.CORRUPTIONS["jpeg"].params[0]
    ours = np.asarray(corruptions.apply("jpeg", None, jnp.asarray(x), 1))
    ref = []
    for im in np.round(x[..., 0] * 255).astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(im, "L").save(buf, "JPEG", quality=int(quality))
        ref.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255)
    ref = np.stack(ref)[..., None]
    # Same table, quality scaling and rounding; only the DCT arithmetic differs.
    assert np.abs(ours - ref).mean() < 2 / 255
    assert np.abs(ours - x).mean() > 5 * np.abs(ours - ref).mean()


def test_registry_and_argument_errors():
    assert len(NAMES) == 11 and set(RANDOM) <= set(NAMES)
    for c in corruptions.CORRUPTIONS.values():
        assert len(c.params) == corruptions.MAX_SEVERITY and c.unit
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(KeyError, match="registered"):
        corruptions.apply("fog", None, x, 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.apply("contrast", None, x, 6)
    with pytest.raises(ValueError, match="NHWC"):
        corruptions.apply("contrast", None, jnp.zeros((8, 8, 1)), 1)
