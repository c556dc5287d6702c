r"""The assessment report: a pipeline workdir (or several seeds of one) -> report.md, CSV, PNG.

  python -m ptq_adversary.report --workdir=DIR [--out=DIR/report] [--no_corruptions]

``DIR`` is either one pipeline workdir (``DIR/results.json``, ``DIR/<mode>/best/``) or a
workdir of several whose sub-directories are pipeline workdirs, by default ``seed_*/`` (the
layout of ``experiments/seeds.py``; another with ``--runs``, a :class:`RunLayout`). For every
run the analyses of :mod:`ptq_adversary.analysis` are computed once and cached under
``OUT/<run>/`` (``assessment.json``, ``per_input_<mode>.npz``, ``corruptions.json``; rerunning
reuses them, ``--force`` recomputes). Across runs every number is reported as the mean with a
95 % Student-t interval (n - 1 degrees of freedom). Written to ``OUT/``::

    report.md              tables and the plots, with the commands that made them
    *.csv                  every table of report.md
    seeds.json             headline numbers per run and their mean and interval
    accuracy_drops.png     drop of each pair under its policy / uniform / random allocations
    bit_histograms.png     bits chosen per site, robust vs detrimental policy
    class_bits.png         mean bits per class and site (input dependence of the allocation)
    flip_vs_margin.png     flip rate per FP-margin decile
    sensitivity.png        one-site-at-a-time sensitivity of both networks
    corruptions.png        accuracy vs severity per corruption, FP and DPTQ, both pairs
    corruption_drops.png   DPTQ drop vs severity per corruption
    corruption_examples.png  one test image under every corruption and severity

The run analyses never write inside a run directory. Submodules:

* :mod:`~ptq_adversary.report.runs`: run discovery (:class:`RunLayout`, :data:`SEEDS_LAYOUT`,
  :func:`find_runs`, :func:`run_modes`, :data:`RESULTS`).
* :mod:`~ptq_adversary.report.cache`: the cached per-run analyses (:func:`assess_run`,
  :func:`corrupt_run`).
* :mod:`~ptq_adversary.report.tables`: CSV and markdown tables, the seeds summary and value
  conversions (:func:`write_table`, :func:`write_seeds_summary`).
* :mod:`~ptq_adversary.report.aggregate`: the analyses pooled over runs into the report's
  tables (``pair_tables``, ``corruption_stats``, ``corruption_tables``).
* :mod:`~ptq_adversary.report.plots` and :mod:`~ptq_adversary.report.corruption_plots`: the
  figures (``plot_*``).
* :mod:`~ptq_adversary.report.markdown`: the text of ``report.md`` (``report_markdown``).
* :mod:`~ptq_adversary.report.build`: :func:`build_report`, all of the above in order.
* :mod:`~ptq_adversary.report.cli` (and ``__main__``): the command, :func:`main`.
"""

from ptq_adversary.report.build import build_report
from ptq_adversary.report.cache import assess_run, corrupt_run
from ptq_adversary.report.cli import main
from ptq_adversary.report.runs import (
    MODES,
    RESULTS,
    SEEDS_LAYOUT,
    RunLayout,
    find_runs,
    run_modes,
)
from ptq_adversary.report.tables import write_seeds_summary, write_table

__all__ = [
    "MODES",
    "RESULTS",
    "RunLayout",
    "SEEDS_LAYOUT",
    "find_runs",
    "run_modes",
    "assess_run",
    "corrupt_run",
    "write_table",
    "write_seeds_summary",
    "build_report",
    "main",
]
