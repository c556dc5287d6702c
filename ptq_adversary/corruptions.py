"""Common corruptions and simple transforms of images, in pure JAX, at severities 0-5.

Every corruption acts on float NHWC images on the raw ``[0, 1]`` pixel scale (before the
dataset's mean/std normalisation) and returns images of the same shape and dtype, clipped to
``[0, 1]``::

    out = corruptions.apply("gaussian_noise", key, images_bhwc, severity)

``severity`` is an int in ``0..5`` and may be traced: each corruption looks its parameter up in
a table, so one compile serves all severities (the "bits are data" habit applied to
corruptions). Severity 0 returns the input exactly. Randomness (noise, the direction of a
rotation or shift) comes only from ``key``, so a corruption is a deterministic function of
``(key, images, severity)``; the draws depend on the key and the image shape, not on the
severity, so a higher severity scales the same noise.

Parameters follow Hendrycks & Dietterich's ImageNet-C/CIFAR-10-C where their units carry over to
28x28 images (noise, brightness, contrast, JPEG quality); blur radii, pixelation block sizes and
the geometric magnitudes are in pixels and chosen here for 28-32 pixel images (the tables below
are the single source). Geometric transforms fill uncovered pixels with 0 (black, Fashion-MNIST's
background) and sample bilinearly.

References:
  Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
  Perturbations", ICLR 2019 (ImageNet-C, CIFAR-10-C); Mu & Gilmer, "MNIST-C", 2019.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["Corruption", "CORRUPTIONS", "MAX_SEVERITY", "apply", "names"]

MAX_SEVERITY = 5


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One corruption: a function of a traced parameter and its severity table.

    Attributes:
      name: registry key.
      family: ``noise``, ``blur``, ``digital`` or ``geometric``.
      fn: ``fn(key, images [B,H,W,C] float in [0,1], param float scalar) -> images``.
      params: the parameter at severities 1..5 (increasing damage).
      unit: what the parameter means, for tables and plots.
    """

    name: str
    family: str
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    params: tuple[float, ...]
    unit: str

    def param(self, severity: ArrayLike) -> jax.Array:
        """The parameter at ``severity`` (1..5; 0 maps to severity 1's, unused)."""
        table = jnp.asarray((self.params[0], *self.params), jnp.float32)
        return table[jnp.clip(jnp.asarray(severity), 0, MAX_SEVERITY)]

    def __call__(self, key: jax.Array, images: ArrayLike, severity: ArrayLike) -> jax.Array:
        """Corrupts ``images`` (float ``[B, H, W, C]`` in ``[0, 1]``) at ``severity`` in 0..5.

        Returns:
          float ``[B, H, W, C]`` of the input's dtype, in ``[0, 1]``; the input itself at
          severity 0.
        """
        images = jnp.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC [B, H, W, C], got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"images must be float on the [0, 1] scale, got {images.dtype}")
        if isinstance(severity, int) and not 0 <= severity <= MAX_SEVERITY:
            raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
        severity = jnp.asarray(severity)
        out = self.fn(key, images, self.param(severity))
        out = jnp.clip(out, 0.0, 1.0).astype(images.dtype)
        return jnp.where(severity == 0, images, out)


# ------------------------------------------------------------------------------------ noise
def _gaussian_noise(key, x, sigma):
    return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def _shot_noise(key, x, photons):
    # Poisson photon counts at `photons` per unit intensity; fewer photons, more noise.
    return jax.random.poisson(key, x * photons, x.shape).astype(x.dtype) / photons


def _impulse_noise(key, x, amount):
    # Salt and pepper: a fraction `amount` of the pixels (per channel) set to 0 or 1, half each.
    u = jax.random.uniform(key, x.shape, x.dtype)
    x = jnp.where(u < amount / 2, 1.0, x)
    return jnp.where((u >= amount / 2) & (u < amount), 0.0, x)


# ------------------------------------------------------------------------------------- blur
def _reflect_index(n: int, radius: int) -> np.ndarray:
    """int ``[n, 2 * radius + 1]``: source index of output pixel i at offset k, reflected."""
    idx = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :]
    period = 2 * (n - 1) if n > 1 else 1
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _taps_matrix(n: int, taps: jax.Array) -> jax.Array:
    """``[n, n]`` matrix applying 1-D filter ``taps [2R+1]`` with reflected borders."""
    radius = (taps.shape[0] - 1) // 2
    one_hot = jax.nn.one_hot(_reflect_index(n, radius), n, dtype=taps.dtype)  # [n, 2R+1, n]
    return jnp.einsum("ikj,k->ij", one_hot, taps)


def _separable(x, matrix_h, matrix_w):
    return jnp.einsum("hi,bijc,wj->bhwc", matrix_h, x, matrix_w)


_BLUR_RADIUS = 7  # taps on each side; covers 3.5 sigma at sigma 2 px


def _gaussian_blur(key, x, sigma):
    del key
    offsets = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=x.dtype)
    taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    return _separable(x, _taps_matrix(x.shape[1], taps), _taps_matrix(x.shape[2], taps))


_DISK_RADIUS = 4  # support of the defocus kernel: 9x9 pixels


def _defocus_blur(key, x, radius):
    # A disk of `radius` pixels with an anti-aliased rim (weight falls from 1 to 0 over the
    # pixel straddling the rim), normalised; depthwise 2-D convolution with reflected borders.
    del key
    r = _DISK_RADIUS
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    dist = jnp.asarray(np.sqrt(yy**2 + xx**2), x.dtype)
    kernel = jnp.clip(radius + 0.5 - dist, 0.0, 1.0)
    kernel = kernel / kernel.sum()
    channels = x.shape[-1]
    kernel_hwio = jnp.broadcast_to(kernel[:, :, None, None], (2 * r + 1, 2 * r + 1, 1, channels))
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    return jax.lax.conv_general_dilated(
        padded,
        kernel_hwio,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


# ---------------------------------------------------------------------------------- digital
def _brightness(key, x, delta):
    del key
    return x + delta


def _contrast(key, x, factor):
    del key
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _block_average_matrix(n: int, block: jax.Array, dtype) -> jax.Array:
    """``[n, n]``: averages pixel i over the pixels in its block ``floor(i / block)``."""
    group = jnp.floor(jnp.arange(n, dtype=dtype) / block)
    same = (group[:, None] == group[None, :]).astype(dtype)
    return same / same.sum(axis=1, keepdims=True)


def _pixelate(key, x, block):
    # Box down-sampling to blocks of `block` pixels (non-integer sizes alternate, e.g. 2 and 3
    # for 2.5) and nearest up-sampling back, as one averaging matrix per axis.
    del key
    return _separable(
        x,
        _block_average_matrix(x.shape[1], block, x.dtype),
        _block_average_matrix(x.shape[2], block, x.dtype),
    )


# The JPEG standard's luminance quantization table (ITU-T T.81, Annex K, Table K.1).
_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float32,
)


def _dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D [n, n]``: coefficients ``D @ block @ D.T``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def _jpeg(key, x, quality):
    # Baseline-JPEG-like: per channel, 8x8 block DCT of the level-shifted 0..255 image, the
    # luminance table scaled by the IJG quality rule, rounding of the coefficients, inverse DCT,
    # rounding to 8-bit pixels. No chroma subsampling or entropy coding (lossless anyway).
    del key
    b, h, w, c = x.shape
    ph, pw = -h % 8, -w % 8
    pixels = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") * 255.0 - 128.0
    blocks = pixels.reshape(b, (h + ph) // 8, 8, (w + pw) // 8, 8, c)
    d = jnp.asarray(_dct_matrix(), x.dtype)
    coef = jnp.einsum("ui,bminjc,vj->bmunvc", d, blocks, d)
    scale = jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
    table = jnp.clip(jnp.floor((jnp.asarray(_JPEG_LUMA) * scale + 50.0) / 100.0), 1.0, 255.0)
    table = table[None, None, :, None, :, None]  # [1, 1, 8(u), 1, 8(v), 1]
    coef = jnp.round(coef / table) * table
    blocks = jnp.einsum("ui,bmunvc,vj->bminjc", d, coef, d)
    pixels = jnp.round(jnp.clip(blocks.reshape(b, h + ph, w + pw, c) + 128.0, 0.0, 255.0))
    return pixels[:, :h, :w, :] / 255.0


# -------------------------------------------------------------------------------- geometric
def _warp(images: jax.Array, inverse: jax.Array, offset: jax.Array) -> jax.Array:
    """Bilinear affine warp of each image about its centre, zero fill.

    Args:
      images: float ``[B, H, W, C]``.
      inverse: float ``[B, 2, 2]``: maps an output pixel's (row, col) offset from the centre to
        the source offset.
      offset: float ``[B, 2]``: source shift (row, col) in pixels added after ``inverse``.

    Returns:
      float ``[B, H, W, C]``.
    """
    _, h, w, _ = images.shape
    centre = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0], images.dtype)
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=images.dtype), jnp.arange(w, dtype=images.dtype), indexing="ij"
    )
    grid = jnp.stack([rows, cols], axis=-1) - centre  # [H, W, 2]

    def one(image_hwc, inv, off):
        src = jnp.einsum("ij,hwj->ihw", inv, grid) + (centre + off)[:, None, None]  # [2, H, W]
        sample = lambda plane: jax.scipy.ndimage.map_coordinates(
            plane, [src[0], src[1]], order=1, mode="constant", cval=0.0
        )
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image_hwc)

    return jax.vmap(one)(images, inverse, offset)


def _rotation(key, x, degrees):
    # Rotation by `degrees` about the centre, clockwise or anticlockwise per image (key).
    sign = jnp.where(jax.random.bernoulli(key, 0.5, (x.shape[0],)), 1.0, -1.0).astype(x.dtype)
    theta = sign * degrees * (math.pi / 180.0)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    inverse = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)  # R(-t)
    return _warp(x, inverse, jnp.zeros((x.shape[0], 2), x.dtype))


def _translation(key, x, pixels):
    # Shift by `pixels` in a direction drawn uniformly per image (key).
    angle = jax.random.uniform(key, (x.shape[0],), x.dtype, 0.0, 2.0 * math.pi)
    shift = pixels * jnp.stack([jnp.sin(angle), jnp.cos(angle)], -1)  # output = input moved
    eye = jnp.broadcast_to(jnp.eye(2, dtype=x.dtype), (x.shape[0], 2, 2))
    return _warp(x, eye, -shift)


_TABLE = (
    Corruption(
        "gaussian_noise", "noise", _gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38), "noise std"
    ),
    Corruption(
        "shot_noise", "noise", _shot_noise, (60.0, 25.0, 12.0, 5.0, 3.0), "photons per unit"
    ),
    Corruption(
        "impulse_noise",
        "noise",
        _impulse_noise,
        (0.03, 0.06, 0.09, 0.17, 0.27),
        "salt+pepper fraction",
    ),
    Corruption(
        "gaussian_blur", "blur", _gaussian_blur, (0.5, 0.75, 1.0, 1.5, 2.0), "kernel std (px)"
    ),
    Corruption(
        "defocus_blur", "blur", _defocus_blur, (0.75, 1.0, 1.5, 2.0, 3.0), "disk radius (px)"
    ),
    Corruption("brightness", "digital", _brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "added intensity"),
    Corruption("contrast", "digital", _contrast, (0.75, 0.5, 0.4, 0.3, 0.15), "contrast factor"),
    Corruption("pixelate", "digital", _pixelate, (1.5, 2.0, 2.5, 3.0, 4.0), "block size (px)"),
    Corruption("jpeg", "digital", _jpeg, (25.0, 18.0, 15.0, 10.0, 7.0), "JPEG quality"),
    Corruption("rotation", "geometric", _rotation, (5.0, 10.0, 15.0, 20.0, 30.0), "angle (deg)"),
    Corruption("translation", "geometric", _translation, (1.0, 2.0, 3.0, 4.0, 5.0), "shift (px)"),
)

#: The registry: name -> :class:`Corruption`, in the order tables and plots use.
CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in _TABLE}


def names() -> tuple[str, ...]:
    """The registered corruption names, in registry order."""
    return tuple(CORRUPTIONS)


def apply(name: str, key: jax.Array, images: ArrayLike, severity: ArrayLike) -> jax.Array:
    """Applies corruption ``name`` at ``severity`` (0..5, may be traced).

    Args:
      name: a key of :data:`CORRUPTIONS`.
      key: a PRNG key (the only source of randomness).
      images: float ``[B, H, W, C]`` on the ``[0, 1]`` pixel scale.
      severity: int scalar in ``0..5``; 0 is the identity.

    Returns:
      float ``[B, H, W, C]`` of the input's dtype, in ``[0, 1]``.

    Raises:
      KeyError: unknown ``name`` (the message lists the registered ones).
    """
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; registered: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](key, images, severity)
