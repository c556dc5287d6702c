"""Host-side metrics: JSON-lines logs (plus TensorBoard when installed) and progress bars.

Steps return flat dicts of scalar arrays; the trainer pulls them to the host only at log steps
(one ``jax.device_get``), checks them for NaN/inf there, and hands them to :class:`MetricWriter`.
Each line of ``metrics.jsonl`` is ``{"step": int, "split": str, <name>: float, ...}``, easy to
load with ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

from ptq_adversary import io

__all__ = [
    "MetricWriter",
    "NonFiniteError",
    "progress_bar",
    "to_host",
]


class NonFiniteError(FloatingPointError):
    """A logged metric became NaN or inf."""


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Pulls a dict of scalar arrays to the host in one transfer, as Python floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class MetricWriter:
    """Appends metrics to ``<workdir>/metrics.jsonl`` and, if available, TensorBoard.

    Only process 0 of a multi-process run writes; every process checks for NaN/inf.

    Args:
      workdir: the run directory.
      resume_step: the step the run (re)starts from: records logged after it by an interrupted
        run, and a last line cut short by a kill, are dropped so the log reads as one
        uninterrupted run. None keeps everything.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``; silently skipped
        when it is not installed).
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: nothing follows it
                    break
                if line.endswith("\n") and record["step"] <= step:
                    kept.append(line)
        io.write_text_atomic(self.path, "".join(kept))

    def write(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
        """Writes one record; raises :class:`NonFiniteError` naming the metric if any is NaN/inf.

        The record is written before the check, so the log shows the bad value.
        """
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
        bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
        if bad:
            raise NonFiniteError(f"non-finite {split} metric(s) {bad} at step {step}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, *, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar over steps with rate and ETA; sparse updates when stderr is not a terminal.

    ``TQDM_DISABLE=1`` in the environment silences it like any tqdm bar.
    """
    interactive = sys.stderr.isatty()
    # `disable` is passed only when set: an explicit disable=False would override tqdm's
    # environment default (TQDM_DISABLE), which tqdm applies as a default keyword.
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
        smoothing=0.1,
        **({"disable": True} if disable else {}),
    )
