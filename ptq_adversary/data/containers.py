"""The in-memory dataset containers: `Split`, `DatasetStats`, `Dataset`, `RawDataset`.

Also the error every source raises when its data is absent (`DatasetUnavailableError`) and the
two array helpers the sources share: `channel_stats` and `readonly`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "DatasetStats",
    "DatasetUnavailableError",
    "RawDataset",
    "Split",
    "channel_stats",
    "readonly",
]


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on this machine and cannot be fetched from here.

    The message says how to get it.
    """


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
        return DatasetStats(*channel_stats(self.train.images))


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 ``[N, H, W, C]`` images, on the [0, 1] scale.

    Computed from a 256-bin histogram per channel, in exact integer arithmetic up to the final
    division, and without a float copy of the dataset. A constant channel has std exactly 0
    (which :func:`~ptq_adversary.data.normalize` rejects), not a rounding residue.

    Returns:
      ``(mean, std)``, each float32 ``[C]``.
    """
    mean, std = [], []
    levels = range(256)
    for c in range(images.shape[-1]):
        counts = [int(k) for k in np.bincount(images[..., c].reshape(-1), minlength=256)]
        n = sum(counts)
        s1 = sum(k * v for k, v in zip(counts, levels, strict=True))
        s2 = sum(k * v * v for k, v in zip(counts, levels, strict=True))
        # Python ints: n * s2 reaches ~1e20 for a 60k-image dataset, past int64.
        mean.append(s1 / (255.0 * n))
        std.append(np.sqrt((n * s2 - s1 * s1) / (n * n)) / 255.0)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def readonly(x: np.ndarray) -> np.ndarray:
    """Marks ``x`` (any shape) read-only in place and returns it.

    Loaded arrays are cached and shared between `Dataset` objects: frozen, an in-place edit by
    one caller cannot leak into another.
    """
    x.flags.writeable = False
    return x
