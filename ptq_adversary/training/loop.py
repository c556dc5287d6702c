"""The training loop every trainer shares: workdir, sharding, resume, logging, preemption.

A trainer builds its state pytree and a jitted ``train_step(state, *batch) -> (state, metrics)``
and hands them to :meth:`Run.fit` with a ``batch_fn(step) -> tuple of numpy arrays``. Because
the batch is a pure function of the step, and the partial logging window is stored in each
checkpoint, a run that is killed (even with SIGKILL) and restarted with the same command ends
bit-identical to an uninterrupted one on the same devices (metrics log included; tested in
tests/training/test_resume.py).

Devices and hosts: the batch axis is sharded over a ``data`` mesh axis spanning every device of
every process, the state is replicated. In a multi-process run (``jax.distributed``) each
process reads and places only its own rows of the global batch (``ptq_adversary.distributed``,
:meth:`Run.put_batch`); with one process this is a plain ``jax.device_put``.

Divergence: a NaN/inf training metric (tracked on device every step, checked at log steps), a
NaN/inf validation metric or a non-finite state (checked before every save) stops the run with
:class:`metrics.NonFiniteError` naming the first bad step. No non-finite state is checkpointed,
and checkpoints of states at or after the first one whose loss was NaN/inf (exploded but finite
weights) are removed, so the last checkpoint left is a good one to resume from.

Workdir layout written here::

    DIR/config.json        the config the run was started with (resume checks it)
    DIR/checkpoints/<step> orbax checkpoints (newest kept; resumed automatically)
    DIR/metrics.jsonl      one JSON record per log/eval step (see ptq_adversary.metrics)
    DIR/tensorboard/       TensorBoard events, when tensorboardX is installed
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ptq_adversary import config as config_lib
from ptq_adversary import distributed, io, metrics
from ptq_adversary.checkpoint import Checkpointer

__all__ = ["Run", "Preempted", "prepare_workdir"]

log = logging.getLogger(__name__)

# Metrics worth a glance in the progress bar, when a step reports them.
_SHOWN = ("loss", "accuracy", "fp_accuracy", "q_accuracy")


class Preempted(SystemExit):
    """Raised after SIGTERM once a checkpoint is on disk; rerunning the command resumes."""


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Creates ``workdir`` and writes ``config.json`` there; returns the absolute path.

    Raises:
      config_lib.ConfigError: the workdir holds a run of another config (a field that fixes
        checkpoint shapes differs from its saved ``config.json``).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    # A saved config binds only once the workdir holds progress; a run that stopped before its
    # first checkpoint (say, its dataset was unavailable) may be restarted with another config.
    if os.path.exists(path) and _holds_a_run(workdir):
        config_lib.compare_with_saved(config, io.read_json(path))
    io.write_json_atomic(path, config_lib.to_dict(config))
    return workdir


def _holds_a_run(workdir: str) -> bool:
    """Whether ``workdir`` (or a stage directory in it) holds checkpoints or results."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        return True
    if os.path.exists(os.path.join(workdir, "results.json")):
        return True
    return any(
        _holds_a_run(entry.path)
        for entry in os.scandir(workdir)
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, "config.json"))
    )


class Run:
    """Workdir plumbing of one trainer invocation.

    Creates ``workdir``, checks a saved ``config.json`` against ``config`` (a workdir of another
    model cannot be resumed), writes the config, builds a data-parallel mesh over every device
    and opens the checkpoint manager and metrics writer. Use as a context manager.

    Args:
      config: the trainer's config; reads ``log``, ``eval.every_steps`` and ``ckpt``.
      workdir: the run directory.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = prepare_workdir(config, workdir)

        # Data parallel over every device: batch sharded on 'data', state replicated. Auto axes
        # let XLA propagate shardings, so vmapping policies into the batch needs no annotations.
        mesh = distributed.data_mesh()
        self.replicated = NamedSharding(mesh, P())
        self.data_sharding = NamedSharding(mesh, P("data"))
        self.ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"), max_to_keep=config.ckpt.max_to_keep
        )
        self._writer: metrics.MetricWriter | None = None
        self.start_step = 0
        self.train_time_s = 0.0
        self._first_bad: jax.Array | None = None
        self._bad_hint = 0
        self._window: tuple[dict[str, jax.Array] | None, int] = (None, 0)

    # ------------------------------------------------------------------ state and checkpoints
    def restore_or_init(self, state: Any) -> Any:
        """Replicates ``state`` and replaces it by the latest checkpoint if there is one."""
        state = distributed.replicate(state, self.replicated)
        if self.ckpt.latest_step() is not None:
            state, meta = self.ckpt.restore(state)
            self.start_step = int(meta.get("step", self.ckpt.latest_step()))
            self._window = _window_from_meta(meta)
            log.info("Resumed %s at step %d", self.workdir, self.start_step)
        return state

    @property
    def writer(self) -> metrics.MetricWriter:
        if self._writer is None:
            # Records after the resumed step (or any, when starting at 0) come from a run that
            # was killed; they are dropped so the log reads as one uninterrupted run.
            self._writer = metrics.MetricWriter(
                self.workdir,
                resume_step=self.start_step,
                tensorboard=self.config.log.tensorboard,
            )
        return self._writer

    def write(self, step: int, values: dict[str, float], *, split: str) -> None:
        self.writer.write(step, values, split=split)

    def put_batch(self, arrays: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
        """Places a host batch on the mesh, sharded over ``data`` (``distributed.put_rows``).

        Args:
          arrays: host arrays with a leading batch axis: the global batch of
            ``config.optim.batch_size`` rows, or (in a multi-process run) only this process's
            rows of it, as ``data.train_batch(..., shard=distributed.process_shard())`` reads.

        Returns:
          Global ``jax.Array``s of the global batch, each device holding its rows.
        """
        return distributed.put_rows(arrays, self.data_sharding, self.config.optim.batch_size)

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        state: Any,
        train_step: Callable[..., tuple[Any, dict[str, jax.Array]]],
        batch_fn: Callable[[int], tuple[np.ndarray, ...]],
        *,
        total_steps: int,
        desc: str,
        eval_fn: Callable[[Any, int], dict[str, float]] | None = None,
        learning_rate: Callable[[int], float] | None = None,
    ) -> Any:
        """Runs ``train_step`` from the resumed step to ``total_steps``; returns the state.

        Args:
          state: the (restored) state pytree; ``train_step`` must return one of the same
            structure. Donated to the step.
          train_step: jitted ``(state, *batch) -> (state, metrics)``, metrics scalar arrays.
          batch_fn: ``step -> tuple of host arrays``; a pure function of the step.
          total_steps: the step to stop at.
          desc: progress-bar label.
          eval_fn: ``(state, step) -> metrics`` on the validation split, every
            ``config.eval.every_steps`` (not at the end: trainers do their final evaluation).
          learning_rate: ``step -> learning rate`` to log with the training metrics.

        Raises:
          Preempted: on SIGTERM, after saving a checkpoint.
          metrics.NonFiniteError: a logged metric or the state became NaN/inf; the message
            names the step and the last (good) checkpoint, which a rerun resumes from.
        """
        try:
            return self._fit(state, train_step, batch_fn, total_steps, desc, eval_fn,
                             learning_rate)  # fmt: skip
        except metrics.NonFiniteError as err:
            raise self._diverged(err) from err

    def _diverged(self, err: metrics.NonFiniteError) -> metrics.NonFiniteError:
        """Drops checkpoints of states at or after the first bad one; says where to resume."""
        first = -1 if self._first_bad is None else int(jax.device_get(self._first_bad))
        # The loss of step s is computed from the state after s - 1 steps: that state, and
        # every later one, is bad even if its arrays are finite (e.g. exploded weights).
        bad_state = first if first >= 0 else self._bad_hint
        self.ckpt.wait()
        removed = [s for s in self.ckpt.all_steps() if s >= bad_state]
        for s in removed:
            self.ckpt.delete(s)
        last = self.ckpt.latest_step()
        where = (
            f"the last good checkpoint is step {last} "
            f"({os.path.join(self.ckpt.directory, str(last))})"
            if last is not None
            else "no good checkpoint is left (a rerun starts afresh)"
        )
        first_text = f" (first at step {first + 1})" if first >= 0 else ""
        removed_text = f"; removed the later checkpoints {removed}" if removed else ""
        return metrics.NonFiniteError(
            f"training diverged: {err}{first_text}{removed_text}; {where}; lower "
            "optim.learning_rate and rerun to resume from it, or set optim.grad_clip_norm in "
            "a new --workdir"
        )

    def _fit(self, state, train_step, batch_fn, total_steps, desc, eval_fn, learning_rate):
        cfg = self.config
        sums, count = self._window
        # Index of the first step whose training metrics were NaN/inf (-1: none), tracked on
        # device every step so a divergence is pinned to its step without a per-step sync.
        self._first_bad, self._bad_hint = None, total_steps
        t0 = time.perf_counter()
        bar = metrics.progress_bar(
            total_steps, initial=self.start_step, desc=desc, disable=not cfg.log.progress
        )
        try:
            with _SigtermFlag() as sigterm:
                for step in range(self.start_step, total_steps):
                    batch = self.put_batch(batch_fn(step))
                    state, step_metrics = train_step(state, *batch)
                    self._first_bad = _track_first_bad(self._first_bad, step_metrics, step)
                    # Summed on device: the host syncs only at log steps.
                    sums = (
                        step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
                    )
                    count += 1
                    done = step + 1
                    bar.update(1)
                    if done % cfg.log.every_steps == 0 or done == total_steps:
                        host = {k: v / count for k, v in metrics.to_host(sums).items()}
                        if learning_rate is not None:
                            host["learning_rate"] = float(learning_rate(done - 1))
                        sums, count = None, 0
                        self.write(done, host, split="train")
                        shown = [k for k in _SHOWN if k in host] or list(host)[:3]
                        bar.set_postfix({k: f"{host[k]:.3f}" for k in shown})
                    if eval_fn is not None and done % cfg.eval.every_steps == 0:
                        if done < total_steps:
                            self._bad_hint = done  # a NaN validation metric: this state is bad
                            self.write(done, eval_fn(state, done), split="val")
                            self._bad_hint = total_steps
                    if done % cfg.ckpt.every_steps == 0 or sigterm.requested:
                        self._save(done, state, sums, count)
                    if sigterm.requested:
                        self.ckpt.wait()
                        raise Preempted(
                            f"SIGTERM: saved a checkpoint at step {done}; rerun the same "
                            "command to resume"
                        )
        finally:
            bar.close()
        self.train_time_s = time.perf_counter() - t0
        self._save(total_steps, state, None, 0)
        return state

    def _save(self, step: int, state: Any, sums: dict[str, jax.Array] | None, count: int) -> None:
        """Checkpoints ``state`` at ``step`` unless it (or the open metric window) is non-finite."""
        meta = _window_meta(step, sums, count)
        bad = [k for k, v in meta["window_sums"].items() if not np.isfinite(v)]
        if bad:
            raise metrics.NonFiniteError(f"non-finite train metric(s) {bad} by step {step}")
        if not bool(_all_finite(state)):
            self._bad_hint = step
            raise metrics.NonFiniteError(f"non-finite values in the training state at step {step}")
        self.ckpt.save(step, state, meta)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.ckpt.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@jax.jit
def _track_first_bad(first_bad: jax.Array | None, step_metrics: Any, step: int) -> jax.Array:
    finite = _all_finite(step_metrics)
    if first_bad is None:
        return jnp.where(finite, -1, step).astype(jnp.int32)
    return jnp.where((first_bad < 0) & ~finite, step, first_bad).astype(jnp.int32)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _window_meta(step: int, sums: dict[str, jax.Array] | None, count: int) -> dict[str, Any]:
    return {
        "step": step,
        "window_count": count,
        "window_sums": metrics.to_host(sums) if sums else {},
    }


def _window_from_meta(meta: dict[str, Any]) -> tuple[dict[str, jax.Array] | None, int]:
    count = int(meta.get("window_count", 0))
    if not count:
        return None, 0
    sums = {k: jnp.asarray(v, jnp.float32) for k, v in meta["window_sums"].items()}
    return sums, count
