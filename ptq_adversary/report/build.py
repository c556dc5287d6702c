"""The whole report: every run's analyses (cached), the tables, the figures and report.md.

:func:`build_report` finds the runs (:mod:`~ptq_adversary.report.runs`), computes or reuses
their analyses (:mod:`~ptq_adversary.report.cache`), pools them into tables
(:mod:`~ptq_adversary.report.aggregate`, :mod:`~ptq_adversary.report.tables`), draws the
figures (:mod:`~ptq_adversary.report.plots`, :mod:`~ptq_adversary.report.corruption_plots`) and
writes ``report.md`` (:mod:`~ptq_adversary.report.markdown`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis, io
from ptq_adversary.report import (
    aggregate,
    cache,
    corruption_plots,
    markdown,
    plots,
    runs,
    tables,
)

__all__ = ["build_report"]

log = logging.getLogger(__name__)


def build_report(
    workdir: str,
    out: str | None = None,
    *,
    corruptions: bool = True,
    corruption_limit: int | None = None,
    corruption_names: Sequence[str] | None = None,
    sensitivity: bool = True,
    batch_size: int = 1000,
    force: bool = False,
    dataset_fn: Callable[[str], Any] | None = None,
    layout: runs.RunLayout = runs.SEEDS_LAYOUT,
) -> str:
    """Computes (or reuses) every run's analyses and writes the report.

    Args:
      workdir: a pipeline workdir or a workdir of several (``seed_*/``), see
        :func:`~ptq_adversary.report.runs.find_runs`.
      out: output directory (default ``workdir/report``).
      corruptions: run and report the corruption evaluation.
      corruption_limit: evaluate corruptions on the first this many test images (all if None).
      corruption_names: corruptions to evaluate (default: every registered one).
      sensitivity: run the one-site-at-a-time probe.
      batch_size: evaluation batch size.
      force: recompute cached analyses.
      dataset_fn: run dir -> dataset (default: :func:`analysis.load_run_dataset`; tests pass
        a synthetic one).
      layout: how the runs of a multi-run workdir are named (default ``seed_<s>``,
        :data:`~ptq_adversary.report.runs.SEEDS_LAYOUT`).

    Returns:
      The path of ``report.md``.
    """
    run_dirs = runs.find_runs(workdir, layout)
    out = os.path.abspath(out or os.path.join(workdir, "report"))
    os.makedirs(out, exist_ok=True)
    dataset_fn = dataset_fn or analysis.load_run_dataset
    results = {name: io.read_json(os.path.join(d, runs.RESULTS)) for name, d in run_dirs.items()}
    modes = [m for m in runs.MODES if all(m in r.get("pairs", {}) for r in results.values())]
    assess, corr = {}, {}
    for name, run_dir in run_dirs.items():
        dataset = None
        cached = os.path.exists(os.path.join(out, name, cache.ASSESSMENT))
        if force or not cached:
            dataset = dataset_fn(run_dir)
        assess[name] = cache.assess_run(
            run_dir,
            os.path.join(out, name),
            dataset=dataset,
            batch_size=batch_size,
            sensitivity=sensitivity,
            force=force,
        )
        if corruptions:
            cached = os.path.exists(os.path.join(out, name, cache.CORRUPTIONS))
            if dataset is None and (force or not cached):
                dataset = dataset_fn(run_dir)
            corr[name] = cache.corrupt_run(
                run_dir,
                os.path.join(out, name),
                dataset=dataset,
                names=corruption_names,
                limit=corruption_limit,
                batch_size=batch_size,
                force=force,
                progress=lambda s, n=name: log.info("%s: %s", n, s),
            )

    seeds = tables.write_seeds_summary(results, out)
    md = aggregate.pair_tables(assess, modes, out)
    plots.plot_drops(results, modes, os.path.join(out, "accuracy_drops.png"))
    plots.plot_bit_histograms(assess, modes, os.path.join(out, "bit_histograms.png"))
    plots.plot_class_bits(assess, modes, os.path.join(out, "class_bits.png"))
    plots.plot_flip_margin(assess, modes, os.path.join(out, "flip_vs_margin.png"))
    if all(a["pairs"][m]["layerwise"]["sensitivity"] for a in assess.values() for m in modes):
        plots.plot_sensitivity(assess, modes, os.path.join(out, "sensitivity.png"))
    if corr:
        stats = aggregate.corruption_stats(corr)
        md.update(aggregate.corruption_tables(stats, modes, out))
        corruption_plots.plot_corruptions(
            stats, modes, len(corr), os.path.join(out, "corruptions.png")
        )
        corruption_plots.plot_corruption_drops(
            stats, modes, os.path.join(out, "corruption_drops.png")
        )
        first_run = next(iter(run_dirs.values()))
        ds = dataset_fn(first_run)
        corruption_plots.plot_corruption_examples(
            ds.test.images[0].astype(np.float32) / 255.0,
            list(dict.fromkeys(k[0] for k in stats)),
            os.path.join(out, "corruption_examples.png"),
        )
    text = markdown.report_markdown(
        workdir, run_dirs, results, assess, corr, seeds, md, modes, out, layout=layout
    )
    path = os.path.join(out, "report.md")
    io.write_text_atomic(path, text)
    return path
