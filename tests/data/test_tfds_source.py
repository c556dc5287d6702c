"""Tests for ptq_adversary.data.tfds_source: offline failure modes and reading without TF."""

import time

import numpy as np
import pytest

from ptq_adversary import data
from ptq_adversary.data import tfds_source


def test_unprepared_tfds_dataset_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "python -m ptq_adversary.data --prepare cifar10 --data_dir DIR" in message
    assert "pip install 'ptq_adversary[tf]'" in message
    assert "data.data_dir" in message


def test_unprepared_tfds_dataset_real_connectivity_check_fails_fast(tmp_path):
    if tfds_source.host_reachable("www.cs.toronto.edu", 443):
        pytest.skip("online: this test checks the offline path")
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError, match="--prepare cifar10"):
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0


def test_host_reachable_is_bounded_and_false_for_unresolvable_host():
    start = time.monotonic()
    assert not tfds_source.host_reachable("does-not-exist.invalid", 443, timeout=1.0)
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
