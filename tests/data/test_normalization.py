"""Tests for ptq_adversary.data.normalization: the pixel map and its finiteness checks."""

import numpy as np
import pytest

from ptq_adversary import data


def test_normalize_maps_uint8_and_float_pixels_alike():
    images = np.arange(0, 256, 5, dtype=np.uint8).reshape(1, -1, 1, 1)
    mean, std = np.asarray([0.5], np.float32), np.asarray([0.25], np.float32)
    out = data.normalize(images, mean, std)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, (images / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.normalize(images.astype(np.float32), mean, std), out)


def test_a_constant_channel_or_non_finite_stats_raise():
    images = np.zeros((1, 2, 2, 2), np.uint8)
    for mean, std in (([0.0, 0.0], [1.0, 0.0]), ([np.inf, 0.0], [1.0, 1.0])):
        with pytest.raises(data.NonFiniteInputError, match="a constant channel"):
            data.normalize(images, np.asarray(mean), np.asarray(std))


def test_check_finite_images_names_the_input_and_the_first_bad_example():
    images = np.zeros((3, 2), np.float64)
    data.check_finite_images(images)
    images[1, 0] = -np.inf
    with pytest.raises(data.NonFiniteInputError, match=r"^user array: 1 of 6 .*example 1\)"):
        data.check_finite_images(images, what="user array")
