"""Tests for ptq_adversary.data.registry: load_dataset's splits, limits and name checks."""

import numpy as np
import pytest

from ptq_adversary import data
from tests.data.fakes import ids


def test_train_val_disjoint_and_covering(synthetic):
    ds = data.load_dataset("synthetic", val_size=250, split_seed=7)
    train_ids, val_ids = ids(ds.train.images), ids(ds.val.images)
    assert len(train_ids) == 750 and len(val_ids) == 250
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(1000))
    # Splits keep the official order; labels travel with their images.
    assert np.all(np.diff(train_ids) > 0)
    np.testing.assert_array_equal(ds.train.labels, train_ids % 3)
    np.testing.assert_array_equal(ids(ds.test.images), np.arange(300))


def test_split_depends_on_split_seed_only(synthetic):
    a = data.load_dataset("synthetic", val_size=100, split_seed=0)
    b = data.load_dataset("synthetic", val_size=100, split_seed=0)
    c = data.load_dataset("synthetic", val_size=100, split_seed=1)
    np.testing.assert_array_equal(ids(a.val.images), ids(b.val.images))
    assert not np.array_equal(ids(a.val.images), ids(c.val.images))


def test_limits_are_deterministic_subsets(synthetic):
    a = data.load_dataset("synthetic", val_size=100, train_limit=64, test_limit=32)
    b = data.load_dataset("synthetic", val_size=100, train_limit=64, test_limit=32)
    full = data.load_dataset("synthetic", val_size=100)
    assert (len(a.train), len(a.val), len(a.test)) == (64, 100, 32)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert set(ids(a.train.images)) <= set(ids(full.train.images))
    np.testing.assert_array_equal(ids(a.test.images), np.arange(32))
    # Normalisation constants come from the full official train split, not the subset.
    np.testing.assert_array_equal(a.mean, full.mean)
    np.testing.assert_array_equal(a.std, full.std)


def test_bad_sizes_raise(synthetic):
    with pytest.raises(ValueError, match="val_size"):
        data.load_dataset("synthetic", val_size=1000)
    with pytest.raises(ValueError, match="train_limit"):
        data.load_dataset("synthetic", train_limit=0)


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        data.load_dataset("imagenet")
    for name in ("fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "mnist"):
        assert name in str(info.value)
