"""Tests for ptq_adversary.data.batching: step-indexed training batches, augmentation, eval."""

import numpy as np
import pytest

from ptq_adversary import data
from ptq_adversary.data import batching
from tests.data.fakes import UNIT_STATS, ids, traceable_split


def test_steps_per_epoch_drops_remainder():
    assert data.steps_per_epoch(10, 3) == 3
    assert data.steps_per_epoch(9, 3) == 3
    with pytest.raises(ValueError):
        data.steps_per_epoch(2, 3)


def test_same_seed_same_batch_different_seed_different_batch():
    split = traceable_split(100)
    kw = dict(batch_size=16, augment=True, dataset_stats=UNIT_STATS)
    a = data.train_batch(split, 5, seed=0, **kw)
    batching.epoch_permutation.cache_clear()  # a resumed process starts with a cold cache
    b = data.train_batch(split, 5, seed=0, **kw)
    c = data.train_batch(split, 5, seed=1, **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.indices, c.indices)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n, b = 96, 16
    spe = data.steps_per_epoch(n, b)
    epochs = [
        np.concatenate(
            [
                data.train_batch_indices(n, step, batch_size=b, seed=3)
                for step in range(e * spe, (e + 1) * spe)
            ]
        )
        for e in range(3)
    ]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_epoch_with_remainder_has_no_repeats():
    n, b = 100, 16
    order = np.concatenate(
        [data.train_batch_indices(n, s, batch_size=b, seed=0) for s in range(n // b)]
    )
    assert len(order) == 96 and len(np.unique(order)) == 96


def test_train_batch_matches_indices_and_normalizes():
    split = traceable_split(50)
    stats = data.DatasetStats(mean=np.array([0.5], np.float32), std=np.array([0.25], np.float32))
    batch = data.train_batch(split, 7, batch_size=8, seed=2, dataset_stats=stats)
    assert batch.images.shape == (8, 8, 8, 1) and batch.images.dtype == np.float32
    assert batch.labels.dtype == np.int32 and batch.indices.dtype == np.int32
    np.testing.assert_array_equal(batch.labels, split.labels[batch.indices])
    expected = (split.images[batch.indices] / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(batch.images, expected, rtol=1e-6, atol=1e-6)


def test_train_batch_accepts_a_dataset_as_stats(synthetic):
    ds = data.load_dataset("synthetic", val_size=100)
    a = data.train_batch(ds.train, 0, batch_size=4, seed=0, dataset_stats=ds)
    b = data.train_batch(ds.train, 0, batch_size=4, seed=0, dataset_stats=ds.stats)
    np.testing.assert_array_equal(a.images, b.images)


def test_augmentation_reproducible_by_seed_and_step_and_shape_preserving():
    split = data.Split(
        images=np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        labels=np.zeros(64, np.int32),
    )
    stats = data.DatasetStats(np.zeros(3, np.float32), np.ones(3, np.float32))
    kw = dict(batch_size=32, dataset_stats=stats, augment=True)
    a = data.train_batch(split, 3, seed=0, **kw)
    b = data.train_batch(split, 3, seed=0, **kw)
    plain = data.train_batch(split, 3, seed=0, batch_size=32, dataset_stats=stats)
    other_step = data.train_batch(split, 5, seed=0, **kw)
    assert a.images.shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.indices, plain.indices)  # augmentation leaves order alone
    assert not np.array_equal(a.images, plain.images)
    other = data.train_batch(split, 5, seed=0, batch_size=32, dataset_stats=stats)
    assert not np.array_equal(other_step.images, other.images)


def test_crop_is_a_window_of_the_zero_padded_image():
    images = np.random.default_rng(1).integers(1, 256, (16, 28, 28, 1), dtype=np.uint8)
    out = data.augment_images(images, np.random.default_rng(0), padding=2, flip=False)
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(out[i], padded[i, dy : dy + 28, dx : dx + 28])
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1


def test_flip_is_left_right_and_configurable():
    images = np.random.default_rng(2).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = data.augment_images(images, np.random.default_rng(0), padding=0, flip=True)
    same = np.all(out == images, axis=(1, 2, 3))
    flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | flipped)
    assert 0 < flipped.sum() < 64
    no_flip = data.augment_images(images, np.random.default_rng(0), padding=0, flip=False)
    np.testing.assert_array_equal(no_flip, images)


def test_default_crop_padding():
    assert data.default_crop_padding(32) == 4
    assert data.default_crop_padding(28) == 2


def test_eval_batches_pad_and_mask_each_example_once():
    split = traceable_split(10)
    batches = list(data.eval_batches(split, batch_size=4, dataset_stats=UNIT_STATS))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (4, 8, 8, 1) and batch.images.dtype == np.float32
        assert batch.labels.shape == (4,) and batch.labels.dtype == np.int32
        assert batch.mask.shape == (4,) and batch.mask.dtype == np.float32
    mask = np.concatenate([b.mask for b in batches])
    assert mask.sum() == 10
    np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
    real = mask.astype(bool)
    images = np.concatenate([b.images for b in batches])
    # UNIT_STATS makes the normalised pixel equal the raw one.
    np.testing.assert_array_equal(ids(images[real].round().astype(np.uint8)), np.arange(10))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches])[real], split.labels)
    assert np.all(images[~real] == 0)


def test_eval_batches_exact_multiple_has_no_padding():
    batches = list(data.eval_batches(traceable_split(8), batch_size=4, dataset_stats=UNIT_STATS))
    assert len(batches) == 2 and all(b.mask.all() for b in batches)
