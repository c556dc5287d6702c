"""Checkpoints: the one module that talks to orbax.

A checkpoint holds a state pytree (arrays only: params, non-param model state, optimizer state,
RNG key, step) plus a small JSON ``meta`` dict (e.g. the step's metrics). orbax writes each step
to a temporary directory and renames it when complete, so a half-written checkpoint is never
picked up by :meth:`Checkpointer.restore`. Nothing is pickled.

Frozen inputs that are not trained in a run (a teacher used for distillation) are never
checkpointed by that run: the run records where they come from instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Periodic, atomic, resumable checkpoints of one training run.

    Args:
      directory: where step directories go (made absolute; orbax requires it).
      max_to_keep: how many of the latest checkpoints to keep.

    The caller decides when to save (every N steps, on SIGTERM, at the end).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

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
          ValueError: the checkpoint does not match ``target`` (another model or config).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match this config's state "
                f"(another model or optimizer?): {str(err).splitlines()[0][:300]}"
            ) from err
        return restored.state, dict(restored.meta or {})

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
