"""Step-indexed batching: a training batch is a pure function of ``(seed, step)``.

A resumed run therefore sees exactly the batches an uninterrupted run would have seen, with no
iterator state to checkpoint. Evaluation batches have a fixed size (the last one padded and
masked), so a jitted step compiles once. Augmentation is a random crop of the zero-padded image
and a random horizontal flip.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ptq_adversary.data.containers import Dataset, DatasetStats, Split, readonly
from ptq_adversary.data.normalization import normalize

__all__ = [
    "EvalBatch",
    "TrainBatch",
    "augment_images",
    "default_crop_padding",
    "epoch_permutation",
    "eval_batches",
    "pad_rows",
    "padded_batches",
    "steps_per_epoch",
    "train_batch",
    "train_batch_indices",
]

# Tags that separate the random streams drawn from one user seed, so that e.g. the order of
# epoch 3 and the augmentation of step 3 are not the same stream.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


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
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples: int64 ``[n]``, read-only.

    A permutation of ``range(n)`` seeded by ``(seed, epoch)``. Cached (every step of an epoch
    needs the same one); ``epoch_permutation.cache_clear()`` empties the cache.
    """
    return readonly(np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n))


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
    perm = epoch_permutation(n, seed, epoch)
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
