"""Datasets from tensorflow_datasets, read without TensorFlow and never hanging offline.

A dataset prepared in the ``array_record`` format is read with ``tfds.data_source``, which does
not need TensorFlow. Preparing one (downloading it) does need TensorFlow and internet; before
any download the host is probed (`host_reachable`), so offline the loader fails at once with
instructions instead of after tfds's minutes of retries. tensorflow_datasets itself is imported
lazily, on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import socket
import threading

import numpy as np

from ptq_adversary.data.containers import DatasetUnavailableError, RawDataset, Split, readonly

__all__ = [
    "CONNECT_TIMEOUT_S",
    "TfdsLoader",
    "host_reachable",
    "import_tfds",
    "tensorflow_installed",
]

#: Seconds allowed for DNS + TCP connect before a download host counts as unreachable. Short on
#: purpose: offline, tfds would otherwise retry each URL for ~200 s before failing.
CONNECT_TIMEOUT_S = 3.0


def host_reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
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


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def import_tfds():
    """The ``tensorflow_datasets`` module, imported on first use.

    Imported lazily: Fashion-MNIST users should not pay tfds's import time, and a broken tfds
    install should not break them.
    """
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
        """The official splits, downloaded first (see `prepare`) if not prepared yet."""
        data_dir = None if data_dir is None else os.fspath(data_dir)
        # Checked before calling tfds.data_source: on an unprepared dataset it raises a
        # misleading NotImplementedError about TFRECORD, or (download=True) hangs offline.
        self.prepare(data_dir)
        return _read_tfds_cached(self.tfds_name, data_dir)

    def prepare(self, data_dir: str | os.PathLike | None) -> None:
        """Downloads and prepares the dataset in ``data_dir`` unless it is prepared there.

        Raises:
          DatasetUnavailableError: it is not prepared and cannot be here: the download host
            does not answer within `CONNECT_TIMEOUT_S`, or TensorFlow is not installed. The
            message says how to prepare it elsewhere (`fix_message`).
        """
        data_dir = None if data_dir is None else os.fspath(data_dir)
        builder = import_tfds().builder(self.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            self._download_or_raise(data_dir)

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
        if not host_reachable(self.download_host, self.download_port):
            raise DatasetUnavailableError(
                f"Dataset {self.tfds_name!r} is not prepared in {where} and its download host "
                f"{self.download_host} is unreachable (offline?), so it cannot be fetched "
                f"here.\n" + self.fix_message(data_dir)
            )
        if not tensorflow_installed():
            raise DatasetUnavailableError(
                f"Dataset {self.tfds_name!r} is not prepared in {where}; preparing it needs "
                f"TensorFlow, which is not installed.\n" + self.fix_message(data_dir)
            )
        _download_and_prepare(self.tfds_name, data_dir)


def _download_and_prepare(tfds_name: str, data_dir: str | None) -> None:
    # array_record, not tfrecord: it is what tfds.data_source reads without TensorFlow.
    # (parquet is not an option: tfds 4.9.10 silently dropped rows when writing it.)
    tfds = import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


# Per-call number of examples decoded at once by data_source; bounds the list of dicts it
# returns while keeping the per-call overhead small.
_DECODE_CHUNK = 4096


@functools.lru_cache(maxsize=4)
def _read_tfds_cached(tfds_name: str, data_dir: str | None) -> RawDataset:
    tfds = import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    info = builder.info
    for split in ("train", "test"):
        if split not in info.splits:
            raise ValueError(f"tfds dataset {tfds_name!r} has no {split!r} split")
    class_names = tuple(info.features["label"].names)
    if str(info.file_format).lower().endswith("array_record"):
        sources = tfds.data_source(tfds_name, data_dir=data_dir, download=False)
        splits = {s: _split_from_source(sources[s]) for s in ("train", "test")}
    elif tensorflow_installed():
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
                images=readonly(np.asarray(a["image"], np.uint8)),
                labels=readonly(np.asarray(a["label"], np.int32)),
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
    return Split(images=readonly(images), labels=readonly(labels))
