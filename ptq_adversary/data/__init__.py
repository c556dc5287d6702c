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

Submodules:

* ``containers``: `Split`, `DatasetStats`, `Dataset`, `RawDataset`, `DatasetUnavailableError`,
  and the shared array helpers ``channel_stats`` and ``readonly``.
* ``idx``: the IDX file format, `read_idx` and `IdxFormatError`.
* ``fashion_mnist``: Fashion-MNIST from IDX files, where they are looked for
  (`FASHION_MNIST_ENV_VAR`, `FASHION_MNIST_DEFAULT_DIR`) and what they are called
  (`FASHION_MNIST_FILES`).
* ``tfds_source``: `TfdsLoader` for tensorflow_datasets, with the network probe
  ``host_reachable`` that makes an offline machine fail fast.
* ``registry``: `DATASETS`, `IMAGE_SHAPES`, `NUM_CLASSES`, `load_dataset` (train/val/test splits and
  statistics) and `prepare`.
* ``normalization``: `normalize`, `check_finite_images` and `NonFiniteInputError`.
* ``batching``: step-indexed `train_batch` (with `augment_images`), `eval_batches`,
  `padded_batches`/`pad_rows`, and the epoch orders behind them (``epoch_permutation``).
* ``cli``: the command line `main`; ``__main__`` runs it.
"""

from ptq_adversary.data.batching import (
    EvalBatch,
    TrainBatch,
    augment_images,
    default_crop_padding,
    eval_batches,
    pad_rows,
    padded_batches,
    steps_per_epoch,
    train_batch,
    train_batch_indices,
)
from ptq_adversary.data.cli import main
from ptq_adversary.data.containers import (
    Dataset,
    DatasetStats,
    DatasetUnavailableError,
    RawDataset,
    Split,
)
from ptq_adversary.data.fashion_mnist import (
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_ENV_VAR,
    FASHION_MNIST_FILES,
)
from ptq_adversary.data.idx import IdxFormatError, read_idx
from ptq_adversary.data.normalization import NonFiniteInputError, check_finite_images, normalize
from ptq_adversary.data.registry import (
    DATASETS,
    IMAGE_SHAPES,
    NUM_CLASSES,
    load_dataset,
    prepare,
)
from ptq_adversary.data.tfds_source import TfdsLoader

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetStats",
    "DatasetUnavailableError",
    "EvalBatch",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV_VAR",
    "FASHION_MNIST_FILES",
    "IMAGE_SHAPES",
    "NUM_CLASSES",
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
