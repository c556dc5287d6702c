"""Fake data for the data tests: IDX files, traceable splits and unit statistics."""

import gzip
import os
import struct

import numpy as np

from ptq_adversary import data


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialises a uint8 array (any shape) in IDX format."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, payload: bytes) -> None:
    """Writes ``payload`` gzip-compressed to ``path``."""
    with gzip.open(path, "wb") as f:
        f.write(payload)


def write_fake_fashion(directory, num_train=40, num_test=12, seed=0):
    """Writes four valid IDX .gz files of 28x28 images; returns the arrays written, by role."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(num_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(num_test) % 10).astype(np.uint8),
    }
    for key, stem in data.FASHION_MNIST_FILES.items():
        write_gz(os.path.join(directory, stem + ".gz"), idx_bytes(arrays[key]))
    return arrays


def id_images(n, h=8, w=8, c=1):
    """uint8 ``[n, h, w, c]`` images whose first two pixels encode the example index."""
    images = np.zeros((n, h, w, c), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return images


def ids(images):
    """The example indices that `id_images` encoded: int64 ``[n]``."""
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def traceable_split(n, h=8, w=8, c=1):
    """A `data.Split` of `id_images` with labels ``index % 3``."""
    return data.Split(images=id_images(n, h, w, c), labels=(np.arange(n) % 3).astype(np.int32))


#: Statistics under which a normalised pixel equals the raw one (one channel).
UNIT_STATS = data.DatasetStats(mean=np.zeros(1, np.float32), std=np.full(1, 1 / 255, np.float32))
