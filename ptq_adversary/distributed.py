"""Multi-process plumbing (``jax.distributed``): which rows a process feeds, and agreement.

With one process every function here is the identity or a no-op, so single-host code pays
nothing. With several (a GPU cluster, a TPU pod slice, or two CPU processes in the tests):

- the devices form one ``data`` mesh ordered by process, so process ``i`` of ``n`` feeds rows
  ``[i B / n, (i + 1) B / n)`` of every global batch of ``B`` (:func:`process_rows`); it reads
  only those rows (``data.train_batch(..., shard=process_shard())``) and places them with
  :func:`put_rows`;
- anything written to disk once (artifacts) is written under a name every process agrees on
  (:func:`agreed_stamp`); orbax's barriers are keyed by the path, so processes saving to
  different paths wait for each other forever;
- :func:`barrier` keeps a process from reading a file before process 0 has written it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from ptq_adversary import data

__all__ = [
    "process_shard", "process_rows", "data_mesh", "put_rows", "eval_arrays", "replicate",
    "agreed_stamp", "barrier",
]  # fmt: skip


def process_shard() -> tuple[int, int]:
    """``(process_index, process_count)``: the ``shard`` argument of ``data.train_batch``."""
    return jax.process_index(), jax.process_count()


def process_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds (all of them with one process).

    Raises:
      ValueError: processes hold different numbers of devices, or the batch does not divide.
    """
    index, count = process_shard()
    if count == 1:
        return slice(0, global_batch)
    if jax.device_count() != count * jax.local_device_count() or global_batch % count:
        raise ValueError(
            f"a global batch of {global_batch} cannot be split evenly over {count} processes "
            f"with {jax.local_device_count()} of {jax.device_count()} devices each"
        )
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def data_mesh() -> Mesh:
    """A 1-D ``data`` mesh over every device of every process.

    With several processes the devices are ordered by process, so each process feeds one
    contiguous block of rows of the global batch (:func:`process_rows`).
    """
    if jax.process_count() == 1:
        return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def put_rows(
    arrays: tuple[np.ndarray, ...], sharding: NamedSharding, global_batch: int
) -> tuple[jax.Array, ...]:
    """Global arrays of a ``global_batch``-row batch from this process's part of it.

    Args:
      arrays: host arrays with a leading batch axis: either the whole global batch (this
        process keeps its rows) or only this process's :func:`process_rows` of it.
      sharding: a sharding of the batch axis over :func:`data_mesh`.
      global_batch: B, the rows of the global batch.

    Returns:
      ``jax.Array``s of ``global_batch`` rows, each device holding its own.

    Raises:
      ValueError: an array has neither ``global_batch`` rows nor this process's count.
    """
    if jax.process_count() == 1:
        return tuple(jax.device_put(arrays, sharding))
    rows = process_rows(global_batch)
    local = rows.stop - rows.start
    out = []
    for a in arrays:
        if len(a) == global_batch:
            a = a[rows]
        elif len(a) != local:
            raise ValueError(
                f"batch has {len(a)} rows; expected the global {global_batch} or this "
                f"process's {local}"
            )
        out.append(
            jax.make_array_from_process_local_data(sharding, a, (global_batch, *a.shape[1:]))
        )
    return tuple(out)


def eval_arrays(
    split: data.Split,
    *,
    batch_size: int,
    dataset_stats: Any,
    sharding: NamedSharding | None = None,
) -> Iterator[tuple[Any, Any, Any]]:
    """``data.eval_batches`` as ``(images, labels, mask)``, placed with ``sharding`` if given.

    With a sharding each process reads only its rows of every batch (:func:`put_rows`);
    without one the host arrays are yielded as they are.
    """
    shard = (0, 1) if sharding is None else process_shard()
    for batch in data.eval_batches(
        split, batch_size=batch_size, dataset_stats=dataset_stats, shard=shard
    ):
        arrays = (batch.images, batch.labels, batch.mask)
        yield arrays if sharding is None else put_rows(arrays, sharding, batch_size)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` placed whole on every device of ``sharding``'s mesh (a ``P()`` sharding).

    With several processes the values go through the host first: arrays committed to one
    local device (a loaded artifact, say) would otherwise need a cross-host transfer, which
    CPU and GPU backends refuse. Every process must pass equal values.
    """
    if jax.process_count() > 1:
        tree = jax.device_get(tree)
    return jax.device_put(tree, sharding)


def agreed_stamp() -> int:
    """A nanosecond timestamp, process 0's in every process (a name all of them save under)."""
    stamp = time.time_ns()
    if jax.process_count() == 1:
        return stamp
    # Two uint32 halves: without jax_enable_x64 an int64 would be truncated on the way.
    halves = np.array([stamp >> 32, stamp & 0xFFFFFFFF], np.uint32)
    hi, lo = (int(v) for v in multihost_utils.broadcast_one_to_all(halves))
    return (hi << 32) | lo


def barrier(name: str) -> None:
    """Waits until every process has reached ``barrier(name)`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
