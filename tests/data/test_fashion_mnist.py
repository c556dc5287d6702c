"""Tests for ptq_adversary.data.fashion_mnist: the real files, where they are found, damage."""

import os

import numpy as np
import pytest

from ptq_adversary import data
from ptq_adversary.data import containers
from tests.data.fakes import idx_bytes, write_fake_fashion, write_gz

FASHION_DIR = data.FASHION_MNIST_DEFAULT_DIR
_have_fashion = all(
    os.path.isfile(os.path.join(FASHION_DIR, f + ".gz")) for f in data.FASHION_MNIST_FILES.values()
)
needs_fashion = pytest.mark.skipif(
    not _have_fashion,
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_DIR}); "
    "apt-get install -y dataset-fashion-mnist",
)


@needs_fashion
def test_fashion_mnist_official_splits():
    raw = data.DATASETS["fashion_mnist"](None)
    assert raw.train.images.shape == (60000, 28, 28, 1)
    assert raw.test.images.shape == (10000, 28, 28, 1)
    assert raw.train.images.dtype == np.uint8 and raw.train.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(raw.train.labels, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(raw.test.labels, minlength=10), np.full(10, 1000))


@needs_fashion
def test_fashion_mnist_dataset_splits_and_stats():
    ds = data.load_dataset("fashion_mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.image_shape == (28, 28, 1)
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.mean.dtype == np.float32 and ds.mean.shape == (1,)
    np.testing.assert_allclose(ds.mean, [0.2860], atol=5e-4)
    np.testing.assert_allclose(ds.std, [0.3530], atol=5e-4)
    # Cross-check the histogram-based stats against a direct computation.
    images = data.DATASETS["fashion_mnist"](None).train.images
    np.testing.assert_allclose(ds.mean, [images.mean(dtype=np.float64) / 255], rtol=1e-6)
    head = images[:5000] / 255.0
    mean, std = containers.channel_stats(images[:5000])
    np.testing.assert_allclose(mean, [head.mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [head.std()], rtol=1e-6)


@needs_fashion
def test_fashion_mnist_train_and_val_cover_the_official_train_split():
    raw = data.DATASETS["fashion_mnist"](None).train
    ds = data.load_dataset("fashion_mnist", val_size=5000, split_seed=3)

    def rows(images):  # one sortable bytes value per image
        return np.sort(np.ascontiguousarray(images.reshape(len(images), -1)).view("V784")[:, 0])

    merged = np.concatenate([ds.train.images, ds.val.images])
    np.testing.assert_array_equal(rows(merged), rows(raw.images))
    merged_labels = np.concatenate([ds.train.labels, ds.val.labels])
    np.testing.assert_array_equal(np.bincount(merged_labels), np.bincount(raw.labels))


@needs_fashion
def test_fashion_mnist_normalized_train_is_standardized():
    ds = data.load_dataset("fashion_mnist", train_limit=2000, test_limit=100)
    assert (len(ds.train), len(ds.test)) == (2000, 100)
    batch = next(data.eval_batches(ds.train, batch_size=2000, dataset_stats=ds))
    assert batch.images.dtype == np.float32
    assert abs(float(batch.images.mean())) < 0.05
    assert abs(float(batch.images.std()) - 1.0) < 0.05


def test_missing_directory_says_how_to_get_fashion_mnist(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert data.FASHION_MNIST_ENV_VAR in message
    assert "train-images-idx3-ubyte.gz" in message


def test_env_var_directory_is_used(tmp_path, monkeypatch):
    arrays = write_fake_fashion(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path))
    ds = data.load_dataset("fashion_mnist", val_size=10)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 12)
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(ds.test.labels, arrays["test_labels"])


def test_corrupt_file_in_dataset_dir_raises(tmp_path):
    write_fake_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:-12])  # cut the gzip trailer and some data
    with pytest.raises(data.IdxFormatError, match="train-labels"):
        data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=5)


def test_mismatched_image_and_label_counts_raise(tmp_path):
    write_fake_fashion(tmp_path)
    write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(data.IdxFormatError, match="12 images but .* 11 labels"):
        data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=5)
