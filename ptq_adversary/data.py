"""Datasets as in-memory numpy arrays, offline first, with step-indexed batching.

Everything here is plain numpy: the datasets used by ptq_adversary (Fashion-MNIST, CIFAR, SVHN,
MNIST) fit in host memory, and a batch that is a pure function of ``(seed, step)`` makes a
resumed run see exactly the batches an uninterrupted run would have seen, with no iterator
state to checkpoint.

Sources:

* ``fashion_mnist`` is read from the four IDX ``.gz`` files that Debian's
  ``dataset-fashion-mnist`` package installs (``/usr/share/datasets/fashion-mnist``). No
  network and no TensorFlow are needed. tfds's own ``fashion_mnist`` builder cannot use these
  files: Debian rewrote the gzip headers, so their checksums differ from the registered ones.
* ``cifar10``, ``cifar100``, ``svhn_cropped`` and ``mnist`` come from tensorflow_datasets. A
  dataset prepared in the ``array_record`` format is read with ``tfds.data_source``, which does
  not need TensorFlow. Preparing one (downloading it) does need TensorFlow and internet::

      pip install 'ptq_adversary[tf]'
      python -m ptq_adversary.data --prepare cifar10 --data_dir DIR

  after which ``DIR`` can be copied to an offline machine and passed as ``data_dir``.

Usage::

  ds = load_dataset("fashion_mnist", val_size=5000)
  for step in range(num_steps):
    batch = train_batch(ds.train, step, batch_size=128, seed=0, augment=True, dataset_stats=ds)
  for images, labels, mask in eval_batches(ds.test, batch_size=256, dataset_stats=ds):
    ...

Command line::

  python -m ptq_adversary.data --info fashion_mnist
  python -m ptq_adversary.data --prepare cifar10 --data_dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import importlib.util
import os
import socket
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetStats",
    "DatasetUnavailableError",
    "EvalBatch",
    "IdxFormatError",
    "NonFiniteInputError",
    "RawDataset",
    "Split",
    "TfdsLoader",
    "TrainBatch",
    "augment_images",
    "check_finite_images",
    "default_crop_padding",
    "eval_batches",
    "load_dataset",
    "main",
    "normalize",
    "pad_rows",
    "padded_batches",
    "prepare",
    "read_idx",
    "steps_per_epoch",
    "train_batch",
    "train_batch_indices",
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
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Seconds allowed for DNS + TCP connect before a download host counts as unreachable. Short on
# purpose: offline, tfds would otherwise retry each URL for ~200 s before failing.
_CONNECT_TIMEOUT_S = 3.0

# Tags that separate the random streams drawn from one user seed, so that e.g. the order of
# epoch 3 and the augmentation of step 3 are not the same stream.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on this machine and cannot be fetched from here.

    The message says how to get it.
    """


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the file it was expected to be."""


class NonFiniteInputError(ValueError):
    """Input images (or the statistics that normalise them) hold NaN or inf."""


# --------------------------------------------------------------------------------------------
# Containers.


# eq=False: the fields are numpy arrays, whose element-wise `==` would make a generated
# __eq__/__hash__ raise; identity semantics are what a data container needs.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, held in memory.

    Attributes:
      images: uint8 ``[N, H, W, C]`` raw pixels, 0..255.
      labels: int32 ``[N]`` class ids in ``[0, num_classes)``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"Split.images must be uint8 [N, H, W, C], got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int32:
            raise ValueError(
                f"Split.labels must be int32 [N], got {self.labels.dtype} {self.labels.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


class DatasetStats(NamedTuple):
    """Per-channel normalisation constants, on the ``[0, 1]`` pixel scale.

    Attributes:
      mean: float32 ``[C]``.
      std: float32 ``[C]``.
    """

    mean: np.ndarray
    std: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset with train/val/test splits and what a model needs to know about it.

    Attributes:
      name: registry name, a key of `DATASETS`.
      train: the official train split minus the validation examples (and cut to
        ``train_limit`` if one was given).
      val: ``val_size`` examples held out of the official train split.
      test: the official test split (first ``test_limit`` examples if one was given).
      num_classes: number of classes C.
      image_shape: ``(H, W, C)``.
      class_names: C names, indexed by label.
      mean: float32 ``[C]`` per-channel pixel mean on the ``[0, 1]`` scale.
      std: float32 ``[C]`` per-channel pixel standard deviation on the ``[0, 1]`` scale.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @property
    def stats(self) -> DatasetStats:
        """The normalisation constants as a `DatasetStats`."""
        return DatasetStats(self.mean, self.std)


@dataclasses.dataclass(frozen=True, eq=False)
class RawDataset:
    """What a loader in `DATASETS` returns: the official splits, before any val carve-out.

    Attributes:
      train: the official train split.
      test: the official test split.
      class_names: names indexed by label.
    """

    train: Split
    test: Split
    class_names: tuple[str, ...]

    @functools.cached_property
    def stats(self) -> DatasetStats:
        """Per-channel mean/std of the official train split; computed once per loaded dataset."""
        return DatasetStats(*_channel_stats(self.train.images))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files.

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "file format").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into a numpy array.

    Args:
      path: an IDX file; read through gzip when its name ends in ``.gz``.

    Returns:
      An array of the dimensions and dtype (native byte order) the header declares, e.g.
      uint8 ``[60000, 28, 28]`` for ``train-images-idx3-ubyte.gz``.

    Raises:
      IdxFormatError: the file is not valid gzip, is truncated, has a bad magic number, or
        holds a different number of bytes than its header declares.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # EOFError is what gzip raises on a file cut short mid-stream.
        raise IdxFormatError(
            f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})"
        ) from e
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header_size} data bytes; it is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _fashion_mnist_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get(FASHION_MNIST_ENV_VAR) or FASHION_MNIST_DEFAULT_DIR


def _find_fashion_mnist_files(directory: str) -> dict[str, str]:
    """Maps each of the four files to its path (``.gz`` preferred, plain IDX accepted)."""
    found, missing = {}, []
    for key, stem in _FASHION_MNIST_FILES.items():
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
            f"{', '.join(s + '.gz' for s in _FASHION_MNIST_FILES.values())}."
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
    return Split(images=_readonly(images[..., None]), labels=_readonly(labels.astype(np.int32)))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(paths: tuple[tuple[str, int, int], ...]) -> RawDataset:
    # Keyed by (path, mtime, size) so that a replaced file is re-read; parsing costs ~0.3 s.
    p = dict(zip(_FASHION_MNIST_FILES, (path for path, _, _ in paths), strict=True))
    num_classes = len(FASHION_MNIST_CLASS_NAMES)
    return RawDataset(
        train=_read_split(p["train_images"], p["train_labels"], num_classes),
        test=_read_split(p["test_images"], p["test_labels"], num_classes),
        class_names=FASHION_MNIST_CLASS_NAMES,
    )


def _load_fashion_mnist(data_dir: str | os.PathLike | None) -> RawDataset:
    """Loads Fashion-MNIST from IDX files; see `load_dataset` for where it looks."""
    found = _find_fashion_mnist_files(_fashion_mnist_dir(data_dir))
    keys = []
    for key in _FASHION_MNIST_FILES:
        st = os.stat(found[key])
        keys.append((os.path.realpath(found[key]), st.st_mtime_ns, st.st_size))
    return _load_fashion_mnist_cached(tuple(keys))


# --------------------------------------------------------------------------------------------
# tensorflow_datasets.


def _host_reachable(host: str, port: int, timeout: float = _CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds in total.

    DNS resolution has no timeout of its own (``getaddrinfo`` can block for tens of seconds on
    a misconfigured resolver), so the whole check runs in a daemon thread that is abandoned
    after ``timeout``.
    """
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _import_tfds():
    # Imported lazily: Fashion-MNIST users should not pay tfds's import time, and a broken tfds
    # install should not break them.
    import tensorflow_datasets as tfds

    return tfds


@dataclasses.dataclass(frozen=True)
class TfdsLoader:
    """Loads a tensorflow_datasets image classification dataset with 'image'/'label' features.

    Attributes:
      tfds_name: the tfds builder name.
      download_host: host the builder downloads from, probed before any download.
      download_port: port of that host (443 for https, 80 for http).
      prepare_packages: extra pip packages its ``download_and_prepare`` needs.
    """

    tfds_name: str
    download_host: str
    download_port: int = 443
    prepare_packages: tuple[str, ...] = ()

    def __call__(self, data_dir: str | os.PathLike | None) -> RawDataset:
        data_dir = None if data_dir is None else os.fspath(data_dir)
        builder = _import_tfds().builder(self.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            # Checked before calling tfds.data_source: on an unprepared dataset it raises a
            # misleading NotImplementedError about TFRECORD, or (download=True) hangs offline.
            self._download_or_raise(data_dir)
        return _read_tfds_cached(self.tfds_name, data_dir)

    def fix_message(self, data_dir: str | None) -> str:
        """The instructions for preparing this dataset elsewhere and using it here."""
        packages = " ".join(["'ptq_adversary[tf]'", *self.prepare_packages])
        where = data_dir or "tfds's default data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
        return (
            f"Fix: on a machine with internet access run\n"
            f"    pip install {packages}   # tfds's image builders need TensorFlow to prepare\n"
            f"    python -m ptq_adversary.data --prepare {self.tfds_name} --data_dir DIR\n"
            f"then copy DIR to this machine and set data.data_dir=DIR (the data_dir argument of "
            f"load_dataset; currently {where})."
        )

    def _download_or_raise(self, data_dir: str | None) -> None:
        where = data_dir or "tfds's default data dir"
        if not _host_reachable(self.download_host, self.download_port):
            raise DatasetUnavailableError(
                f"Dataset {self.tfds_name!r} is not prepared in {where} and its download host "
                f"{self.download_host} is unreachable (offline?), so it cannot be fetched "
                f"here.\n" + self.fix_message(data_dir)
            )
        if not _tensorflow_installed():
            raise DatasetUnavailableError(
                f"Dataset {self.tfds_name!r} is not prepared in {where}; preparing it needs "
                f"TensorFlow, which is not installed.\n" + self.fix_message(data_dir)
            )
        _download_and_prepare(self.tfds_name, data_dir)


def _download_and_prepare(tfds_name: str, data_dir: str | None) -> None:
    # array_record, not tfrecord: it is what tfds.data_source reads without TensorFlow.
    # (parquet is not an option: tfds 4.9.10 silently dropped rows when writing it.)
    tfds = _import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


# Per-call number of examples decoded at once by data_source; bounds the list of dicts it
# returns while keeping the per-call overhead small.
_DECODE_CHUNK = 4096


@functools.lru_cache(maxsize=4)
def _read_tfds_cached(tfds_name: str, data_dir: str | None) -> RawDataset:
    tfds = _import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    info = builder.info
    for split in ("train", "test"):
        if split not in info.splits:
            raise ValueError(f"tfds dataset {tfds_name!r} has no {split!r} split")
    class_names = tuple(info.features["label"].names)
    if str(info.file_format).lower().endswith("array_record"):
        sources = tfds.data_source(tfds_name, data_dir=data_dir, download=False)
        splits = {s: _split_from_source(sources[s]) for s in ("train", "test")}
    elif _tensorflow_installed():
        arrays = tfds.as_numpy(
            tfds.load(
                tfds_name,
                split=["train", "test"],
                data_dir=data_dir,
                batch_size=-1,
                download=False,
            )
        )
        splits = {
            s: Split(
                images=_readonly(np.asarray(a["image"], np.uint8)),
                labels=_readonly(np.asarray(a["label"], np.int32)),
            )
            for s, a in zip(("train", "test"), arrays, strict=True)
        }
    else:
        raise DatasetUnavailableError(
            f"Dataset {tfds_name!r} is prepared as {info.file_format}, which only TensorFlow "
            f"reads. Either pip install 'ptq_adversary[tf]', or re-prepare it as array_record "
            f"with: python -m ptq_adversary.data --prepare {tfds_name} --data_dir DIR"
        )
    return RawDataset(train=splits["train"], test=splits["test"], class_names=class_names)


def _split_from_source(source) -> Split:
    n = len(source)
    first = source[0] if n else None
    if first is None:
        raise ValueError("empty tfds split")
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _DECODE_CHUNK):
        indices = list(range(start, min(start + _DECODE_CHUNK, n)))
        for i, example in zip(indices, source.__getitems__(indices), strict=True):
            images[i] = example["image"]
            labels[i] = example["label"]
    return Split(images=_readonly(images), labels=_readonly(labels))


# --------------------------------------------------------------------------------------------
# Registry and load_dataset.

DATASETS: dict[str, Callable[[str | os.PathLike | None], RawDataset]] = {
    "fashion_mnist": _load_fashion_mnist,
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


def _readonly(x: np.ndarray) -> np.ndarray:
    # Loaded arrays are cached and shared between Dataset objects: freeze them so that an
    # in-place edit by one caller cannot leak into another.
    x.flags.writeable = False
    return x


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 ``[N, H, W, C]`` images, on the [0, 1] scale.

    Computed from a 256-bin histogram per channel: exact, and no float copy of the dataset.
    """
    mean, std = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].reshape(-1), minlength=256).astype(np.float64)
        m = counts @ values / counts.sum()
        var = counts @ (values - m) ** 2 / counts.sum()
        mean.append(m)
        std.append(np.sqrt(var))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


# --------------------------------------------------------------------------------------------
# Batching.


class TrainBatch(NamedTuple):
    """A training batch.

    Attributes:
      images: float32 ``[B, H, W, C]``, normalised (and augmented if asked).
      labels: int32 ``[B]``.
      indices: int32 ``[B]`` positions of the examples in the split (e.g. to look up cached
        teacher logits).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


class EvalBatch(NamedTuple):
    """A fixed-size evaluation batch; the last one of a split is padded.

    Attributes:
      images: float32 ``[B, H, W, C]``, normalised; zeros where padded.
      labels: int32 ``[B]``; 0 where padded.
      mask: float32 ``[B]``, 1 for real examples and 0 for padding.
    """

    images: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def check_finite_images(images: np.ndarray, *, what: str = "images") -> None:
    """Raises :class:`NonFiniteInputError` if float ``images`` hold NaN or inf.

    Call it where float images enter from outside (a user array, a file of floats): a single
    NaN pixel would otherwise turn the quantizer's per-example range, and every logit of that
    example, into NaN without a word.

    Args:
      images: ``[B, ...]`` of any dtype (integer images always pass).
      what: how the message names the input.
    """
    images = np.asarray(images)
    if images.dtype.kind not in "fc":
        return
    finite = np.isfinite(images)
    if finite.all():
        return
    bad = np.size(finite) - int(np.count_nonzero(finite))
    first = int(np.argwhere(~finite)[0][0]) if images.ndim else 0
    raise NonFiniteInputError(
        f"{what}: {bad} of {images.size} values are NaN or inf (first in example {first}); "
        "input images must be finite"
    )


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to ``(x / 255 - mean) / std``.

    Args:
      images: uint8 ``[..., C]`` (float pixels on the 0..255 scale are accepted and checked).
      mean: float ``[C]`` on the [0, 1] scale, finite.
      std: float ``[C]`` on the [0, 1] scale, finite and > 0.

    Returns:
      float32 ``[..., C]``, finite.

    Raises:
      NonFiniteInputError: float ``images`` hold NaN/inf, or ``mean``/``std`` are not finite
        or ``std`` has a zero (a constant channel), which would make every pixel inf/NaN.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise NonFiniteInputError(
            f"dataset_stats: mean must be finite and std finite and > 0 per channel, got "
            f"mean {mean.tolist()}, std {std.tolist()} (a constant channel?)"
        )
    check_finite_images(images)
    scale = np.float32(1.0 / 255.0) / std
    return images.astype(np.float32) * scale - mean / std


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps in one pass over ``n`` examples; the remainder is dropped.

    Raises:
      ValueError: ``batch_size`` is not positive or exceeds ``n``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples of the split")
    return n // batch_size


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: every step of an epoch needs the same permutation.
    return _readonly(np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n))


def train_batch_indices(n: int, step: int, *, batch_size: int, seed: int) -> np.ndarray:
    """Positions in the split of the examples that make up training batch ``step``.

    Epoch ``e = step // steps_per_epoch(n, batch_size)`` visits the examples in the order of a
    permutation seeded by ``(seed, e)``; each epoch sees every example at most once and all but
    ``n % batch_size`` of them (a different remainder each epoch).

    Args:
      n: number of examples in the split.
      step: global training step, >= 0.
      batch_size: B.
      seed: non-negative int.

    Returns:
      int32 ``[B]``.
    """
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    spe = steps_per_epoch(n, batch_size)
    epoch, pos = divmod(step, spe)
    perm = _epoch_permutation(n, seed, epoch)
    return perm[pos * batch_size : (pos + 1) * batch_size].astype(np.int32)


def default_crop_padding(height: int) -> int:
    """Zero padding for random crops: 4 px for 32x32 (the CIFAR ResNet recipe), else 2 px.

    2 px for 28x28 (Fashion-)MNIST, whose objects fill the frame: 4 px would cut into them.
    """
    return 4 if height >= 32 else 2


def augment_images(
    images: np.ndarray, rng: np.random.Generator, *, padding: int, flip: bool = True
) -> np.ndarray:
    """Random crop after zero padding, then (optionally) random horizontal flip.

    Args:
      images: ``[B, H, W, C]`` of any dtype (raw uint8 pixels, so padding is black).
      rng: draws B crop offsets and B flip coins.
      padding: pixels of zeros added on each side before cropping back to ``H x W``.
      flip: whether to flip each image left-right with probability 1/2.

    Returns:
      ``[B, H, W, C]`` of the same dtype.
    """
    draws = _augment_draws(rng, len(images), padding=padding, flip=flip)
    return _apply_augment(images, draws, padding=padding)


def _augment_draws(
    rng: np.random.Generator, b: int, *, padding: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Crop offsets ``dy``, ``dx`` and flip coins for ``b`` images, in a fixed draw order."""
    dy = rng.integers(0, 2 * padding + 1, size=b)
    dx = rng.integers(0, 2 * padding + 1, size=b)
    flipped = rng.random(b) < 0.5 if flip else None
    return dy, dx, flipped


def _apply_augment(images: np.ndarray, draws, *, padding: int) -> np.ndarray:
    dy, dx, flipped = draws
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = dy[:, None] + np.arange(h)  # [B, H]
    cols = np.arange(w)[None, :]  # [1, W]
    if flipped is not None:
        cols = np.where(flipped[:, None], w - 1 - cols, cols)  # [B, W]
    cols = dx[:, None] + cols
    # One gather does crop and flip together.
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
    """Rows ``[i B / n, (i + 1) B / n)`` of a global batch of ``B`` for shard ``(i, n)``."""
    index, count = shard
    if count < 1 or not 0 <= index < count or batch_size % count:
        raise ValueError(f"shard {shard} does not split a batch of {batch_size} evenly")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def train_batch(
    split: Split,
    step: int,
    *,
    batch_size: int,
    seed: int,
    augment: bool = False,
    dataset_stats: DatasetStats | Dataset,
    flip: bool = True,
    crop_padding: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> TrainBatch:
    """The training batch for global step ``step``: a pure function of its arguments.

    A run resumed at step ``s`` therefore sees the same batches as an uninterrupted one.

    Args:
      split: the split to draw from (usually ``dataset.train``).
      step: global training step, >= 0.
      batch_size: B.
      seed: non-negative int; seeds the epoch orders ``(seed, epoch)`` and the augmentation
        ``(seed, step)`` in separate streams.
      augment: random crop with zero padding and random horizontal flip.
      dataset_stats: anything with per-channel ``mean``/``std`` (a `Dataset` or `DatasetStats`).
      flip: with ``augment``, whether to flip. Standard for CIFAR and Fashion-MNIST; pass False
        for digits (MNIST, SVHN), where a flip changes the meaning.
      crop_padding: with ``augment``, the zero padding; default `default_crop_padding`.
      shard: ``(index, count)``: only rows ``[index B / count, (index + 1) B / count)`` of the
        global batch, each equal to the same row of the full batch (augmentation included).
        A process of a multi-host run reads just its own rows this way.

    Returns:
      A `TrainBatch`: float32 ``[B / count, H, W, C]`` images, int32 ``[B / count]`` labels
      and indices.
    """
    rows = _shard_rows(batch_size, shard)
    indices = train_batch_indices(len(split), step, batch_size=batch_size, seed=seed)[rows]
    images = split.images[indices]
    if augment:
        if crop_padding is None:
            crop_padding = default_crop_padding(images.shape[1])
        rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])
        # Drawn for the whole global batch, so a shard's rows match the full batch's.
        draws = _augment_draws(rng, batch_size, padding=crop_padding, flip=flip)
        draws = tuple(None if d is None else d[rows] for d in draws)
        images = _apply_augment(images, draws, padding=crop_padding)
    return TrainBatch(
        images=normalize(images, dataset_stats.mean, dataset_stats.std),
        labels=split.labels[indices],
        indices=indices,
    )


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """Fixed-size batches over ``n`` examples, the last one padded (so a jitted step compiles once).

    Yields:
      ``(start, stop, pad)``: the batch holds examples ``[start, stop)`` followed by ``pad`` padding
      rows, ``stop - start + pad == batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, batch_size - (stop - start)


def pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
    """``x [N, ...]`` with ``pad`` zero rows appended: ``[N + pad, ...]``, the same dtype."""
    if pad == 0:
        return x
    return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])


def eval_batches(
    split: Split,
    *,
    batch_size: int,
    dataset_stats: DatasetStats | Dataset,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[EvalBatch]:
    """Yields the whole split in order, in batches of exactly ``batch_size``.

    The last batch is padded, so a jitted eval step compiles once; weight per-example metrics by
    ``mask`` so that every example counts exactly once.

    Args:
      split: the split to evaluate.
      batch_size: B.
      dataset_stats: anything with per-channel ``mean``/``std``.
      shard: ``(index, count)``: yield only rows ``[index B / count, (index + 1) B / count)``
        of each batch (a process's part in a multi-host run).

    Yields:
      `EvalBatch` with float32 ``[B, H, W, C]`` images, int32 ``[B]`` labels, float32 ``[B]``
      mask (``B / count`` rows with a shard). Batch ``i`` holds examples ``i * B`` to
      ``i * B + sum(mask) - 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard != (0, 1):
        rows = _shard_rows(batch_size, shard)
        for batch in eval_batches(split, batch_size=batch_size, dataset_stats=dataset_stats):
            yield EvalBatch(*(a[rows] for a in batch))
        return
    for start, stop, pad in padded_batches(len(split), batch_size):
        images = normalize(split.images[start:stop], dataset_stats.mean, dataset_stats.std)
        mask = np.zeros((batch_size,), np.float32)
        mask[: stop - start] = 1.0
        yield EvalBatch(
            images=pad_rows(images, pad), labels=pad_rows(split.labels[start:stop], pad), mask=mask
        )


# --------------------------------------------------------------------------------------------
# Preparation and command line.


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
    builder = _import_tfds().builder(loader.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return
    loader._download_or_raise(data_dir)


def _print_info(ds: Dataset) -> None:
    print(f"dataset      {ds.name}")
    print(f"train        {len(ds.train)}")
    print(f"val          {len(ds.val)}")
    print(f"test         {len(ds.test)}")
    print(f"image_shape  {ds.image_shape}")
    print(f"num_classes  {ds.num_classes}")
    print(f"class_names  {', '.join(ds.class_names)}")
    print(f"mean         {np.array2string(ds.mean, precision=4)}")
    print(f"std          {np.array2string(ds.std, precision=4)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--prepare NAME`` or ``--info NAME``, with ``--data_dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m ptq_adversary.data", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prepare", metavar="NAME", choices=sorted(DATASETS))
    group.add_argument("--info", metavar="NAME", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--split_seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.prepare:
            prepare(args.prepare, args.data_dir)
            print(f"{args.prepare} is ready in {args.data_dir or 'the default location'}.")
        else:
            _print_info(
                load_dataset(
                    args.info,
                    data_dir=args.data_dir,
                    val_size=args.val_size,
                    split_seed=args.split_seed,
                )
            )
    except (DatasetUnavailableError, IdxFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
