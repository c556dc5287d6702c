"""Pixel normalisation, and the finiteness checks at the points where images enter."""

from __future__ import annotations

import numpy as np

__all__ = ["NonFiniteInputError", "check_finite_images", "normalize"]


class NonFiniteInputError(ValueError):
    """Input images (or the statistics that normalise them) hold NaN or inf."""


def check_finite_images(images: np.ndarray, *, what: str = "images") -> None:
    """Raises :class:`NonFiniteInputError` if float ``images`` hold NaN or inf.

    Call it where float images enter from outside (a user array, a file of floats): a single
    NaN pixel would otherwise turn the quantizer's per-example range, and every logit of that
    example, into NaN without a word.

    Args:
      images: ``[B, ...]`` of any dtype (integer images always pass).
      what: how the message names the input.
    """
    images = np.asarray(images)
    if images.dtype.kind not in "fc":
        return
    finite = np.isfinite(images)
    if finite.all():
        return
    bad = np.size(finite) - int(np.count_nonzero(finite))
    first = int(np.argwhere(~finite)[0][0]) if images.ndim else 0
    raise NonFiniteInputError(
        f"{what}: {bad} of {images.size} values are NaN or inf (first in example {first}); "
        "input images must be finite"
    )


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to ``(x / 255 - mean) / std``.

    Args:
      images: uint8 ``[..., C]`` (float pixels on the 0..255 scale are accepted and checked).
      mean: float ``[C]`` on the [0, 1] scale, finite.
      std: float ``[C]`` on the [0, 1] scale, finite and > 0.

    Returns:
      float32 ``[..., C]``, finite.

    Raises:
      NonFiniteInputError: float ``images`` hold NaN/inf, or ``mean``/``std`` are not finite
        or ``std`` has a zero (a constant channel), which would make every pixel inf/NaN.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise NonFiniteInputError(
            f"dataset_stats: mean must be finite and std finite and > 0 per channel, got "
            f"mean {mean.tolist()}, std {std.tolist()} (a constant channel?)"
        )
    check_finite_images(images)
    scale = np.float32(1.0 / 255.0) / std
    return images.astype(np.float32) * scale - mean / std
