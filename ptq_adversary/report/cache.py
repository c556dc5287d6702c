"""The per-run analyses of a report, computed once and cached next to the report.

For every run, :func:`assess_run` caches the transitory and layer-wise analyses of its pairs
(``OUT/<run>/assessment.json``, ``OUT/<run>/per_input_<mode>.npz``) and :func:`corrupt_run`
the corruption evaluation (``OUT/<run>/corruptions.json``); a rerun reuses them unless forced.
Nothing is written inside a run directory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis, io
from ptq_adversary.report import runs, tables

__all__ = ["ASSESSMENT", "CORRUPTIONS", "assess_run", "corrupt_run"]

log = logging.getLogger(__name__)

#: The cache files in ``OUT/<run>/`` of :func:`assess_run` and :func:`corrupt_run`.
ASSESSMENT = "assessment.json"
CORRUPTIONS = "corruptions.json"


def assess_run(
    run_dir: str,
    out_dir: str,
    *,
    dataset=None,
    batch_size: int = 1000,
    sensitivity: bool = True,
    force: bool = False,
    advance: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Transitory and layer-wise analyses of every pair of a run, cached in ``out_dir``.

    Writes ``out_dir/assessment.json`` (``{"pairs": {mode: analysis.assess_pair(...)}}``
    without the per-input arrays) and ``out_dir/per_input_<mode>.npz`` (those arrays).

    Args:
      run_dir: the pipeline workdir; out_dir: where the cache goes.
      dataset: the run's data (default: :func:`analysis.load_run_dataset`).
      batch_size, sensitivity: as in :func:`analysis.assess_pair`.
      force: recompute even if ``assessment.json`` exists.
      advance: progress, called after each batch with the fraction of the run's work done in
        it (each pair an equal share; the calls sum to 1), e.g. a bar's ``update``; never
        called when the cache is reused.

    Returns:
      The contents of ``assessment.json``.
    """
    path = os.path.join(out_dir, ASSESSMENT)
    if os.path.exists(path) and not force:
        return io.read_json(path)
    os.makedirs(out_dir, exist_ok=True)
    dataset = dataset if dataset is not None else analysis.load_run_dataset(run_dir)
    pairs = {}
    modes = runs.run_modes(run_dir)
    share = (lambda f: advance(f / len(modes))) if advance is not None else None
    for mode in modes:
        t0 = time.perf_counter()
        result = analysis.assess_pair(
            run_dir,
            mode,
            dataset=dataset,
            batch_size=batch_size,
            sensitivity=sensitivity,
            advance=share,
        )
        per_input = result.pop("per_input")
        np.savez_compressed(
            os.path.join(out_dir, f"per_input_{mode}.npz"),
            **{k: np.asarray(v) for k, v in per_input.items()},
        )
        result["time_s"] = round(time.perf_counter() - t0, 2)
        pairs[mode] = result
        log.info("assessed %s/%s in %.1f s", run_dir, mode, result["time_s"])
    out = {"run_dir": os.path.abspath(run_dir), "pairs": pairs}
    io.write_json_atomic(path, tables.jsonable(out))
    return io.read_json(path)


def corrupt_run(
    run_dir: str,
    out_dir: str,
    *,
    dataset=None,
    names: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """FP and DPTQ accuracy of every pair of a run under every corruption, cached.

    Writes ``out_dir/corruptions.json``: ``{"num_examples", "seed", "rows"}`` with the rows of
    :func:`analysis.evaluate_corruptions` on the first ``limit`` test images (all if None).
    """
    path = os.path.join(out_dir, CORRUPTIONS)
    if os.path.exists(path) and not force:
        return io.read_json(path)
    os.makedirs(out_dir, exist_ok=True)
    dataset = dataset if dataset is not None else analysis.load_run_dataset(run_dir)
    split = dataset.test
    if limit is not None:
        split = type(split)(images=split.images[:limit], labels=split.labels[:limit])
    pairs = {m: analysis.load_pair(run_dir, m) for m in runs.run_modes(run_dir)}
    t0 = time.perf_counter()
    rows = analysis.evaluate_corruptions(
        pairs, split, dataset, names=names, batch_size=batch_size, seed=seed, progress=progress
    )
    out = {
        "num_examples": len(split),
        "seed": seed,
        "rows": rows,
        "time_s": round(time.perf_counter() - t0, 2),
    }
    io.write_json_atomic(path, tables.jsonable(out))
    return out
