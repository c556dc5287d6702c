"""Tests for ptq_adversary.data.containers: split validation and exact channel statistics."""

import numpy as np
import pytest

from ptq_adversary import data
from ptq_adversary.data import containers


def test_split_rejects_wrong_dtypes_ranks_and_lengths():
    images, labels = np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int32)
    assert len(data.Split(images, labels)) == 4
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, C\]"):
        data.Split(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, C\]"):
        data.Split(images[..., 0], labels)
    with pytest.raises(ValueError, match=r"int32 \[N\]"):
        data.Split(images, labels.astype(np.int64))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        data.Split(images, labels[:3])


def test_channel_stats_are_exact_per_channel():
    images = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    mean, std = containers.channel_stats(images)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3,)
    direct = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, direct.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, direct.std(axis=(0, 1, 2)), rtol=1e-6)


def test_a_constant_channel_has_std_exactly_zero_and_normalize_rejects_it():
    # Float accumulation left a residue (std ~2.8e-17), which normalize accepted and turned
    # into pixels of ~1e16; the integer sums give exactly 0.
    images = np.concatenate(
        [np.full((40, 3, 3, 1), 77, np.uint8),
         np.random.default_rng(1).integers(0, 256, (40, 3, 3, 1), dtype=np.uint8)], axis=-1
    )  # fmt: skip
    mean, std = containers.channel_stats(images)
    assert std[0] == 0.0 and std[1] > 0
    assert mean[0] == np.float32(77 / 255)
    with pytest.raises(data.NonFiniteInputError, match="a constant channel"):
        data.normalize(images, mean, std)


def test_raw_dataset_stats_come_from_train_and_are_computed_once():
    train = data.Split(np.full((3, 2, 2, 1), 51, np.uint8), np.zeros(3, np.int32))
    test = data.Split(np.zeros((2, 2, 2, 1), np.uint8), np.zeros(2, np.int32))
    raw = data.RawDataset(train=train, test=test, class_names=("a",))
    np.testing.assert_allclose(raw.stats.mean, [0.2], rtol=1e-6)
    assert raw.stats.std.tolist() == [0.0]
    assert raw.stats is raw.stats


def test_readonly_freezes_in_place():
    x = np.zeros(3)
    assert containers.readonly(x) is x
    with pytest.raises(ValueError, match="read-only"):
        x[0] = 1.0
