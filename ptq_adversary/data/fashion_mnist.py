"""Fashion-MNIST from the four IDX ``.gz`` files of Debian's ``dataset-fashion-mnist`` package.

No network and no TensorFlow are needed. tfds's own ``fashion_mnist`` builder cannot use these
files: Debian rewrote the gzip headers, so their checksums differ from the registered ones.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ptq_adversary.data.containers import DatasetUnavailableError, RawDataset, Split, readonly
from ptq_adversary.data.idx import IdxFormatError, read_idx

__all__ = [
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV_VAR",
    "FASHION_MNIST_FILES",
    "load_fashion_mnist",
]

FASHION_MNIST_ENV_VAR = "PTQ_ADVERSARY_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: The four files of the dataset by role, as IDX file names without ``.gz`` (a directory may
#: hold ``<name>.gz``, preferred, or the plain ``<name>``).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _fashion_mnist_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get(FASHION_MNIST_ENV_VAR) or FASHION_MNIST_DEFAULT_DIR


def _find_fashion_mnist_files(directory: str) -> dict[str, str]:
    """Maps each of the four files to its path (``.gz`` preferred, plain IDX accepted)."""
    found, missing = {}, []
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (stem + ".gz", stem):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[key] = path
                break
        else:
            missing.append(stem + ".gz")
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found: {directory!r} lacks {', '.join(missing)}.\n"
            "Fix, either of:\n"
            "  * install Debian's copy (works offline from the apt mirror):\n"
            "      apt-get install -y dataset-fashion-mnist\n"
            f"    which puts the files in {FASHION_MNIST_DEFAULT_DIR};\n"
            "  * or point data.data_dir (the data_dir argument) or the environment variable "
            f"{FASHION_MNIST_ENV_VAR} at a directory holding the four IDX .gz files "
            f"{', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}."
        )
    return found


def _read_split(images_path: str, labels_path: str, num_classes: int) -> Split:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxFormatError(
            f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= num_classes:
        raise IdxFormatError(f"{labels_path}: label {labels.max()} >= {num_classes} classes")
    return Split(images=readonly(images[..., None]), labels=readonly(labels.astype(np.int32)))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(paths: tuple[tuple[str, int, int], ...]) -> RawDataset:
    # Keyed by (path, mtime, size) so that a replaced file is re-read; parsing costs ~0.3 s.
    p = dict(zip(FASHION_MNIST_FILES, (path for path, _, _ in paths), strict=True))
    num_classes = len(FASHION_MNIST_CLASS_NAMES)
    return RawDataset(
        train=_read_split(p["train_images"], p["train_labels"], num_classes),
        test=_read_split(p["test_images"], p["test_labels"], num_classes),
        class_names=FASHION_MNIST_CLASS_NAMES,
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None) -> RawDataset:
    """Loads Fashion-MNIST from IDX files (the `DATASETS` loader of ``"fashion_mnist"``).

    Args:
      data_dir: the directory of the four files; None: ``$PTQ_ADVERSARY_FASHION_MNIST_DIR``,
        else ``/usr/share/datasets/fashion-mnist``.

    Returns:
      The official splits: uint8 ``[60000, 28, 28, 1]`` train and ``[10000, 28, 28, 1]`` test
      images (read-only, cached until a file changes), int32 labels.

    Raises:
      DatasetUnavailableError: a file is missing; the message says how to get them.
      IdxFormatError: a file is truncated or corrupt.
    """
    found = _find_fashion_mnist_files(_fashion_mnist_dir(data_dir))
    keys = []
    for key in FASHION_MNIST_FILES:
        st = os.stat(found[key])
        keys.append((os.path.realpath(found[key]), st.st_mtime_ns, st.st_size))
    return _load_fashion_mnist_cached(tuple(keys))
