"""Checkpoints: the one module that talks to orbax.

A checkpoint holds a state pytree (arrays only: params, non-param model state, optimizer state,
RNG key, step) plus a small JSON ``meta`` dict (e.g. the step's metrics). orbax writes each step
to a temporary directory, writes ``commit_success.txt`` into it and renames it when complete.
A step directory without that marker (a copy cut short, a disk that lost the rename's data) is
moved aside as ``<step>.incomplete-<time>`` and never restored; temporary directories of a save
that was killed are ignored. Nothing is pickled.

Restoring checks the checkpoint's array metadata against the state the config builds first, so
a workdir of another model fails with a message naming the first differing array, and a
checkpoint whose files are damaged fails with :class:`CheckpointError` naming the step directory
and the fix, never with a raw orbax or tensorstore traceback.

Frozen inputs that are not trained in a run (a teacher used for distillation) are never
checkpointed by that run: the run records where they come from instead.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "COMMIT_FILE",
    "error_reason",
    "silence_closed_loop_callbacks",
]

log = logging.getLogger(__name__)

#: The file orbax writes into a step directory once every item of it is on disk.
COMMIT_FILE = "commit_success.txt"


class CheckpointError(ValueError):
    """A checkpoint cannot be restored: it is damaged or holds another config's state.

    ``str(err)`` is one line naming the step directory and what to do.
    """


class Checkpointer:
    """Periodic, atomic, resumable checkpoints of one training run.

    Args:
      directory: where step directories go (made absolute; orbax requires it).
      max_to_keep: how many of the latest checkpoints to keep.

    The caller decides when to save (every N steps, on SIGTERM, at the end).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        _set_aside_incomplete(self.directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes the checkpoint at ``step`` (e.g. one taken after a run diverged)."""
        self._manager.wait_until_finished()
        self._manager.delete(step)

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
        """Saves ``state`` (an array pytree) and ``meta`` (JSON) at ``step``, asynchronously.

        Returns:
          Whether a save was started: False when ``step`` is already saved, so a final save
          after a periodic one at the same step is harmless.
        """
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(dict(meta or {})),
            ),
            force=True,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint at ``step`` (default: latest) into ``target``'s structure.

        Args:
          target: a pytree with the structure, shapes, dtypes and shardings to restore into
            (concrete arrays or ``jax.ShapeDtypeStruct``).
          step: which step; None for the latest.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: there is no checkpoint.
          CheckpointError: the checkpoint holds arrays of other names, shapes or dtypes than
            ``target`` (another model or config), or its files are damaged.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = os.path.join(self.directory, str(step))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        previous_hook = silence_closed_loop_callbacks()
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types)
            raise self._damaged(step, err) from err
        if (mismatch := _first_mismatch(stored, abstract)) is not None:
            raise CheckpointError(
                f"checkpoint {path} holds another run's state ({mismatch}); use a new "
                "--workdir, or the config that wrote it"
            )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # noqa: BLE001
            raise self._damaged(step, err) from err
        sys.unraisablehook = previous_hook  # restored cleanly: nothing left in flight
        return restored.state, dict(restored.meta or {})

    def _damaged(self, step: int, err: BaseException) -> CheckpointError:
        path = os.path.join(self.directory, str(step))
        older = [s for s in self.all_steps() if s < step]
        fix = (
            f"delete {path} to resume from step {older[-1]}"
            if older
            else f"delete {path} to start afresh"
        )
        return CheckpointError(
            f"checkpoint {path} is damaged (corrupt or truncated: {error_reason(err)}); {fix}"
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_reason(err: BaseException, limit: int = 120) -> str:
    """``err``'s message on one line, cut to ``limit`` characters (orbax's run to pages)."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def silence_closed_loop_callbacks():
    """Drops the "Event loop is closed" reports of reads still in flight after a failed restore.

    When one array of a damaged checkpoint fails to read, orbax's restore stops its asyncio loop
    while tensorstore still completes the other reads; their callbacks then report
    ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``, a screenful of
    tracebacks around the one-line error; and a read coroutine abandoned that way reports its
    own read error when it is garbage-collected (closed: the error is caused by
    ``GeneratorExit``). Only those reports are dropped; others pass through.

    Returns:
      The hook it replaced, to put back once a restore has succeeded.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_ptq_adversary_filter", False):
        return previous

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if inspect.iscoroutine(unraisable.object) and isinstance(exc.__cause__, GeneratorExit):
            return
        previous(unraisable)

    hook._ptq_adversary_filter = True
    sys.unraisablehook = hook
    return previous


def _set_aside_incomplete(directory: str) -> None:
    """Renames step directories that lack orbax's commit marker, so they are never restored."""
    if not os.path.isdir(directory) or jax.process_index() != 0:
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path) and not _committed(path):
            aside = f"{path}.incomplete-{time.time_ns()}"
            log.warning(
                "Checkpoint %s is incomplete (no %s); moved to %s", path, COMMIT_FILE, aside
            )
            os.rename(path, aside)


def _committed(path: str) -> bool:
    return os.path.exists(os.path.join(path, COMMIT_FILE))


def _first_mismatch(stored: Any, abstract: Any) -> str | None:
    """The first array whose name, shape or dtype differs between a checkpoint and a target."""
    tree = getattr(stored, "tree", stored)
    have = ocp.tree.to_flat_dict(tree)
    want = ocp.tree.to_flat_dict(abstract)
    name = lambda key: "/".join(str(k) for k in key)  # noqa: E731
    for key in sorted(set(have) & set(want)):  # the most telling difference first
        a, b = have[key], want[key]
        if tuple(a.shape) != tuple(b.shape):
            return f"{name(key)} has shape {tuple(a.shape)} there but {tuple(b.shape)} here"
        if a.dtype is not None and jax.numpy.dtype(a.dtype) != jax.numpy.dtype(b.dtype):
            return f"{name(key)} has dtype {a.dtype} there but {b.dtype} here"
    for key in sorted(set(have) - set(want)):
        return f"{name(key)} is in the checkpoint but not in this config's state"
    for key in sorted(set(want) - set(have)):
        return f"{name(key)} is missing from the checkpoint"
    return None
