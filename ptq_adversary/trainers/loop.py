"""The training loop every trainer shares: workdir, sharding, resume, logging, preemption.

A trainer builds its state pytree and a jitted ``train_step(state, *batch) -> (state, metrics)``
and hands them to :meth:`Run.fit` with a ``batch_fn(step) -> tuple of numpy arrays``. Because
the batch is a pure function of the step, and the partial logging window is stored in each
checkpoint, a run that is killed and restarted with the same command ends bit-identical to an
uninterrupted one (metrics log included).

Workdir layout written here::

    DIR/config.json        the config the run was started with (resume checks it)
    DIR/checkpoints/<step> orbax checkpoints (newest kept; resumed automatically)
    DIR/metrics.jsonl      one JSON record per log/eval step (see ptq_adversary.metrics)
    DIR/tensorboard/       TensorBoard events, when tensorboardX is installed
"""

from __future__ import annotations

import contextlib
import json
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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ptq_adversary import config_lib, metrics
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
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config_lib.compare_with_saved(config, json.load(f))
    metrics.write_json_atomic(path, config_lib.to_dict(config))
    return workdir


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
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(mesh, P())
        self.data_sharding = NamedSharding(mesh, P("data"))
        self.ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"), max_to_keep=config.ckpt.max_to_keep
        )
        self._writer: metrics.MetricWriter | None = None
        self.start_step = 0
        self.train_time_s = 0.0
        self._window: tuple[dict[str, jax.Array] | None, int] = (None, 0)

    # ------------------------------------------------------------------ state and checkpoints
    def restore_or_init(self, state: Any) -> Any:
        """Replicates ``state`` and replaces it by the latest checkpoint if there is one."""
        state = jax.device_put(state, self.replicated)
        if self.ckpt.latest_step() is not None:
            state, meta = self.ckpt.restore(state)
            self.start_step = int(meta.get("step", self.ckpt.latest_step()))
            self._window = _window_from_meta(meta)
            log.info("Resumed %s at step %d", self.workdir, self.start_step)
        return state

    @property
    def writer(self) -> metrics.MetricWriter:
        if self._writer is None:
            self._writer = metrics.MetricWriter(
                self.workdir,
                resume_step=self.start_step or None,
                tensorboard=self.config.log.tensorboard,
            )
        return self._writer

    def write(self, step: int, values: dict[str, float], *, split: str) -> None:
        self.writer.write(step, values, split=split)

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
          metrics.NonFiniteError: a logged metric is NaN/inf; the last good checkpoint stays.
        """
        cfg = self.config
        sums, count = self._window
        t0 = time.perf_counter()
        bar = metrics.progress_bar(
            total_steps, initial=self.start_step, desc=desc, disable=not cfg.log.progress
        )
        try:
            with _SigtermFlag() as sigterm:
                for step in range(self.start_step, total_steps):
                    batch = jax.device_put(batch_fn(step), self.data_sharding)
                    state, step_metrics = train_step(state, *batch)
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
                            self.write(done, eval_fn(state, done), split="val")
                    if done % cfg.ckpt.every_steps == 0 or sigterm.requested:
                        self.ckpt.save(done, state, _window_meta(done, sums, count))
                    if sigterm.requested:
                        self.ckpt.wait()
                        raise Preempted(
                            f"SIGTERM: saved a checkpoint at step {done}; rerun the same "
                            "command to resume"
                        )
        finally:
            bar.close()
        self.train_time_s = time.perf_counter() - t0
        self.ckpt.save(total_steps, state, _window_meta(total_steps, None, 0))
        return state

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.ckpt.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
