"""The dataset registry (`DATASETS`, `IMAGE_SHAPES`, `NUM_CLASSES`), `load_dataset` and `prepare`.

`load_dataset` holds a validation split out of a source's official train split and takes the
normalisation statistics from the whole official train split.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ptq_adversary.data.containers import Dataset, RawDataset, Split
from ptq_adversary.data.fashion_mnist import load_fashion_mnist
from ptq_adversary.data.tfds_source import TfdsLoader

__all__ = ["DATASETS", "IMAGE_SHAPES", "NUM_CLASSES", "load_dataset", "prepare"]

DATASETS: dict[str, Callable[[str | os.PathLike | None], RawDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": TfdsLoader("mnist", "storage.googleapis.com"),
    "cifar10": TfdsLoader("cifar10", "www.cs.toronto.edu"),
    "cifar100": TfdsLoader("cifar100", "www.cs.toronto.edu"),
    # SVHN is served over plain http; its .mat files are parsed with scipy.
    "svhn_cropped": TfdsLoader(
        "svhn_cropped", "ufldl.stanford.edu", download_port=80, prepare_packages=("scipy",)
    ),
}


#: Per-example image shape ``(H, W, C)`` of each registered dataset, known without loading it
#: (config validation derives a model's sites from shapes alone).
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (28, 28, 1),
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
    "svhn_cropped": (32, 32, 3),
}

#: Number of classes of each registered dataset, known without loading it (config validation
#: builds a model for the data's real classes and channels).
NUM_CLASSES: dict[str, int] = {
    "fashion_mnist": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn_cropped": 10,
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; allowed names: {', '.join(sorted(DATASETS))}")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Loads a dataset into memory with a validation split held out of the official train split.

    Args:
      name: a key of `DATASETS`.
      data_dir: for ``fashion_mnist``, the directory holding the four IDX ``.gz`` files
        (default: ``$PTQ_ADVERSARY_FASHION_MNIST_DIR``, else
        ``/usr/share/datasets/fashion-mnist``); for tfds datasets, the tfds data dir (default:
        tfds's own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      val_size: examples moved from the official train split into ``val``; 0 gives an empty val.
      split_seed: seeds the permutation that picks the val examples (and the ``train_limit``
        subset). Train and val are disjoint and, without ``train_limit``, their union is the
        official train split.
      train_limit: if given, keep a deterministic (``split_seed``) random subset of this many
        training examples, for smoke tests; clipped to what is available.
      test_limit: if given, keep the first this many test examples; clipped likewise.

    Returns:
      A `Dataset`. Splits keep the official order of their examples. ``mean``/``std`` are
      computed on the full official train split, so they do not change with ``val_size``,
      ``split_seed`` or the limits: a model trained on a smoke subset normalises like one
      trained on everything.

    Raises:
      ValueError: unknown ``name`` (the message lists the allowed ones) or bad sizes.
      DatasetUnavailableError: the data is not on this machine and cannot be fetched; the
        message says how to get it. (An unprepared tfds dataset is downloaded only when its
        host answers within a few seconds and TensorFlow is installed; otherwise this is
        raised at once instead of tfds's minutes of retries.)
      IdxFormatError: a Fashion-MNIST file is truncated or corrupt.
    """
    _check_name(name)
    for arg, value in (("train_limit", train_limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be None or >= 1, got {value}")
    raw = DATASETS[name](data_dir)

    num_train = len(raw.train)
    if not 0 <= val_size < num_train:
        raise ValueError(f"val_size must be in [0, {num_train}) for {name!r}, got {val_size}")
    perm = np.random.default_rng(split_seed).permutation(num_train)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_idx = np.arange(min(len(raw.test), test_limit or len(raw.test)))
    mean, std = raw.stats
    return Dataset(
        name=name,
        train=_take(raw.train, np.sort(train_idx)),
        val=_take(raw.train, np.sort(val_idx)),
        test=_take(raw.test, test_idx),
        num_classes=len(raw.class_names),
        image_shape=tuple(int(d) for d in raw.train.images.shape[1:]),
        class_names=raw.class_names,
        mean=mean,
        std=std,
    )


def _take(split: Split, indices: np.ndarray) -> Split:
    return Split(images=split.images[indices], labels=split.labels[indices])


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Makes ``name`` loadable offline from ``data_dir``, downloading it if needed.

    For tfds datasets this downloads and writes ``array_record`` files under ``data_dir``,
    which needs internet and TensorFlow (``pip install 'ptq_adversary[tf]'``). For
    ``fashion_mnist`` there is nothing to prepare beyond the IDX files; this checks they parse.

    Raises:
      ValueError: unknown ``name``.
      DatasetUnavailableError: offline, or TensorFlow missing; the message says what to do.
    """
    _check_name(name)
    loader = DATASETS[name]
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if not isinstance(loader, TfdsLoader):
        loader(data_dir)
        return
    loader.prepare(data_dir)
