"""The assessment report: a pipeline workdir (or several seeds of one) -> report.md, CSV, PNG.

  python -m ptq_adversary.report --workdir=DIR [--out=DIR/report] [--no_corruptions]
      [--runs=seed_{}]

The command line of :func:`~ptq_adversary.report.build.build_report` (see
:mod:`ptq_adversary.report` for what it writes). Exit status 2, with the reason on stderr,
when ``DIR`` holds no finished pipeline run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ptq_adversary.report import build, runs

__all__ = ["main"]


def _layout(name: str) -> runs.RunLayout:
    try:
        return runs.RunLayout(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the report from the command line ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m ptq_adversary.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", required=True, help="pipeline or seeds workdir")
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/report)")
    parser.add_argument("--no_corruptions", action="store_true", help="skip corruptions")
    parser.add_argument("--no_sensitivity", action="store_true", help="skip the site probe")
    parser.add_argument(
        "--corruption_limit", type=int, default=None, help="corrupt only the first N test images"
    )
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--force", action="store_true", help="recompute cached analyses")
    parser.add_argument(
        "--runs",
        type=_layout,
        default=runs.SEEDS_LAYOUT,
        metavar="NAME",
        help="run directories of a multi-run WORKDIR, {} for the seed or key "
        f"(default {runs.SEEDS_LAYOUT.name}, as experiments/seeds.py writes them)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        path = build.build_report(
            args.workdir,
            args.out,
            corruptions=not args.no_corruptions,
            corruption_limit=args.corruption_limit,
            sensitivity=not args.no_sensitivity,
            batch_size=args.batch_size,
            force=args.force,
            layout=args.runs,
        )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
