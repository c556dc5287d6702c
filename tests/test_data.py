"""Tests for ptq_adversary.data: IDX parsing, splits, batching, offline failure modes."""

import gzip
import os
import struct
import time

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from ptq_adversary import data  # noqa: E402

FASHION_DIR = data.FASHION_MNIST_DEFAULT_DIR
_have_fashion = all(
    os.path.isfile(os.path.join(FASHION_DIR, f + ".gz")) for f in data._FASHION_MNIST_FILES.values()
)
needs_fashion = pytest.mark.skipif(
    not _have_fashion,
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_DIR}); "
    "apt-get install -y dataset-fashion-mnist",
)


# ---------------------------------------------------------------------------------------------
# Helpers.


def _idx_bytes(array: np.ndarray) -> bytes:
    """Serialises a uint8 array in IDX format."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _write_fake_fashion(directory, num_train=40, num_test=12, seed=0):
    """Writes four valid IDX .gz files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(num_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(num_test) % 10).astype(np.uint8),
    }
    for key, stem in data._FASHION_MNIST_FILES.items():
        _write_gz(os.path.join(directory, stem + ".gz"), _idx_bytes(arrays[key]))
    return arrays


def _id_images(n, h=8, w=8, c=1):
    """uint8 images whose first two pixels encode the example index, so examples are traceable."""
    images = np.zeros((n, h, w, c), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return images


def _ids(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def _split(n, h=8, w=8, c=1):
    return data.Split(images=_id_images(n, h, w, c), labels=(np.arange(n) % 3).astype(np.int32))


_UNIT_STATS = data.DatasetStats(mean=np.zeros(1, np.float32), std=np.full(1, 1 / 255, np.float32))


@pytest.fixture
def synthetic(monkeypatch):
    """Registers 'synthetic': 1000 traceable train examples and 300 test examples."""
    raw = data.RawDataset(train=_split(1000), test=_split(300), class_names=("a", "b", "c"))
    monkeypatch.setitem(data.DATASETS, "synthetic", lambda data_dir: raw)
    return raw


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST.


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
    mean, std = data._channel_stats(images[:5000])
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


# ---------------------------------------------------------------------------------------------
# Splits.


def test_train_val_disjoint_and_covering(synthetic):
    ds = data.load_dataset("synthetic", val_size=250, split_seed=7)
    train_ids, val_ids = _ids(ds.train.images), _ids(ds.val.images)
    assert len(train_ids) == 750 and len(val_ids) == 250
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(1000))
    # Splits keep the official order; labels travel with their images.
    assert np.all(np.diff(train_ids) > 0)
    np.testing.assert_array_equal(ds.train.labels, train_ids % 3)
    np.testing.assert_array_equal(_ids(ds.test.images), np.arange(300))


def test_split_depends_on_split_seed_only(synthetic):
    a = data.load_dataset("synthetic", val_size=100, split_seed=0)
    b = data.load_dataset("synthetic", val_size=100, split_seed=0)
    c = data.load_dataset("synthetic", val_size=100, split_seed=1)
    np.testing.assert_array_equal(_ids(a.val.images), _ids(b.val.images))
    assert not np.array_equal(_ids(a.val.images), _ids(c.val.images))


def test_limits_are_deterministic_subsets(synthetic):
    a = data.load_dataset("synthetic", val_size=100, train_limit=64, test_limit=32)
    b = data.load_dataset("synthetic", val_size=100, train_limit=64, test_limit=32)
    full = data.load_dataset("synthetic", val_size=100)
    assert (len(a.train), len(a.val), len(a.test)) == (64, 100, 32)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert set(_ids(a.train.images)) <= set(_ids(full.train.images))
    np.testing.assert_array_equal(_ids(a.test.images), np.arange(32))
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


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST files: location and corruption.


def test_missing_directory_says_how_to_get_fashion_mnist(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert data.FASHION_MNIST_ENV_VAR in message
    assert "train-images-idx3-ubyte.gz" in message


def test_env_var_directory_is_used(tmp_path, monkeypatch):
    arrays = _write_fake_fashion(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path))
    ds = data.load_dataset("fashion_mnist", val_size=10)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 12)
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(ds.test.labels, arrays["test_labels"])


def test_read_idx_roundtrip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    _write_gz(tmp_path / "x.gz", _idx_bytes(array))
    (tmp_path / "x").write_bytes(_idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x"), array)


def test_truncated_gzip_raises_clear_error(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    _write_gz(tmp_path / "full.gz", _idx_bytes(array))
    blob = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.IdxFormatError, match="truncated"):
        data.read_idx(tmp_path / "cut.gz")


def test_not_gzip_raises_clear_error(tmp_path):
    (tmp_path / "junk.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(data.IdxFormatError, match="corrupt"):
        data.read_idx(tmp_path / "junk.gz")


def test_idx_payload_shorter_than_header_raises(tmp_path):
    array = np.zeros((10, 28, 28), np.uint8)
    _write_gz(tmp_path / "short.gz", _idx_bytes(array)[:-100])  # valid gzip, short payload
    with pytest.raises(data.IdxFormatError, match=r"declares shape \(10, 28, 28\)"):
        data.read_idx(tmp_path / "short.gz")


def test_idx_bad_magic_raises(tmp_path):
    _write_gz(tmp_path / "bad.gz", b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.IdxFormatError, match="magic"):
        data.read_idx(tmp_path / "bad.gz")


def test_corrupt_file_in_dataset_dir_raises(tmp_path):
    _write_fake_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:-12])  # cut the gzip trailer and some data
    with pytest.raises(data.IdxFormatError, match="train-labels"):
        data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=5)


def test_mismatched_image_and_label_counts_raise(tmp_path):
    _write_fake_fashion(tmp_path)
    _write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(data.IdxFormatError, match="12 images but .* 11 labels"):
        data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=5)


# ---------------------------------------------------------------------------------------------
# tfds datasets.


def test_unprepared_tfds_dataset_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_host_reachable", lambda host, port, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "python -m ptq_adversary.data --prepare cifar10 --data_dir DIR" in message
    assert "pip install 'ptq_adversary[tf]'" in message
    assert "data.data_dir" in message


def test_unprepared_tfds_dataset_real_connectivity_check_fails_fast(tmp_path):
    if data._host_reachable("www.cs.toronto.edu", 443):
        pytest.skip("online: this test checks the offline path")
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError, match="--prepare cifar10"):
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0


def test_host_reachable_is_bounded_and_false_for_unresolvable_host():
    start = time.monotonic()
    assert not data._host_reachable("does-not-exist.invalid", 443, timeout=1.0)
    assert time.monotonic() - start < 3.0


def test_prepared_array_record_dataset_is_read_without_tensorflow(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    pil_image = pytest.importorskip("PIL.Image")

    class PtqAdversaryTestTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 3)),
                        "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(30, 0),
                "test": self._generate_examples(7, 1),
            }

        def _generate_examples(self, n, offset):
            for i in range(n):
                image = np.full((8, 8, 3), i + 100 * offset, np.uint8)
                # PIL images: tfds encodes numpy image features through TensorFlow.
                yield i, {"image": pil_image.fromarray(image), "label": i % 3}

    builder = PtqAdversaryTestTiny(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    # A loader whose host is unreachable: reading a prepared dataset must not need the network.
    loader = data.TfdsLoader(builder.name, "does-not-exist.invalid")
    monkeypatch.setitem(data.DATASETS, "tiny", loader)
    ds = data.load_dataset("tiny", data_dir=tmp_path, val_size=6)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 6, 7)
    assert ds.image_shape == (8, 8, 3) and ds.class_names == ("x", "y", "z")
    # tfds stores examples in its own (hash-shuffled, fixed) order, not in generation order.
    test_ids = ds.test.images[:, 0, 0, 0].astype(np.int32) - 100
    np.testing.assert_array_equal(np.sort(test_ids), np.arange(7))
    np.testing.assert_array_equal(ds.test.labels, test_ids % 3)
    ids = np.concatenate([ds.train.images[:, 0, 0, 0], ds.val.images[:, 0, 0, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(30))
    np.testing.assert_array_equal(ds.train.labels, ds.train.images[:, 0, 0, 0] % 3)
    assert np.all(ds.train.images == ds.train.images[:, :1, :1, :1])  # decoded intact
    np.testing.assert_allclose(ds.mean, np.full(3, np.arange(30).mean() / 255), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Training batches.


def test_steps_per_epoch_drops_remainder():
    assert data.steps_per_epoch(10, 3) == 3
    assert data.steps_per_epoch(9, 3) == 3
    with pytest.raises(ValueError):
        data.steps_per_epoch(2, 3)


def test_same_seed_same_batch_different_seed_different_batch():
    split = _split(100)
    kw = dict(batch_size=16, augment=True, dataset_stats=_UNIT_STATS)
    a = data.train_batch(split, 5, seed=0, **kw)
    data._epoch_permutation.cache_clear()  # a resumed process starts with a cold cache
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
    split = _split(50)
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


# ---------------------------------------------------------------------------------------------
# Augmentation.


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


# ---------------------------------------------------------------------------------------------
# Evaluation batches.


def test_eval_batches_pad_and_mask_each_example_once():
    split = _split(10)
    batches = list(data.eval_batches(split, batch_size=4, dataset_stats=_UNIT_STATS))
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
    # _UNIT_STATS makes the normalised pixel equal the raw one.
    np.testing.assert_array_equal(_ids(images[real].round().astype(np.uint8)), np.arange(10))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches])[real], split.labels)
    assert np.all(images[~real] == 0)


def test_eval_batches_exact_multiple_has_no_padding():
    batches = list(data.eval_batches(_split(8), batch_size=4, dataset_stats=_UNIT_STATS))
    assert len(batches) == 2 and all(b.mask.all() for b in batches)


# ---------------------------------------------------------------------------------------------
# Command line.


def test_cli_info_and_prepare(tmp_path, capsys, monkeypatch):
    _write_fake_fashion(tmp_path)
    assert (
        data.main(["--info", "fashion_mnist", "--data_dir", str(tmp_path), "--val_size", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "train        36" in out and "val          4" in out and "test         12" in out
    assert data.main(["--prepare", "fashion_mnist", "--data_dir", str(tmp_path)]) == 0
    monkeypatch.setattr(data, "_host_reachable", lambda host, port, timeout=3.0: False)
    assert data.main(["--prepare", "cifar10", "--data_dir", str(tmp_path / "tfds")]) == 1
    assert "--prepare cifar10" in capsys.readouterr().err
