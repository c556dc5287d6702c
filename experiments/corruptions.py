r"""Shift robustness: FP and greedy-DPTQ accuracy of both pairs under every corruption.

  python experiments/corruptions.py --workdir=runs/seeds [--out=runs/seeds/report] [--limit=N]

For every run in ``WORKDIR`` (a pipeline workdir, or ``seed_*/`` pipeline workdirs) evaluates
the corruptions and severities listed below on the test split and caches the rows in
``OUT/<run>/corruptions.json`` (the file the report reads; ``--force`` recomputes). Prints the
accuracy averaged over severities 1-5 per corruption. The report
(``python -m ptq_adversary.report --workdir=WORKDIR``) turns the cache into
``corruptions.png``, ``corruption_drops.png`` and ``corruptions.csv``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ptq_adversary import report  # noqa: E402

# Explicit: the rows of the paper's shift analysis (ptq_adversary/corruptions.py has the
# parameter of each severity).
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "defocus_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg",
    "rotation",
    "translation",
)
SEVERITIES = (1, 2, 3, 4, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="default WORKDIR/report")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = args.out or os.path.join(args.workdir, "report")
    for name, run_dir in report.find_runs(args.workdir).items():
        result = report.corrupt_run(
            run_dir,
            os.path.join(out, name),
            names=CORRUPTIONS,
            limit=args.limit,
            batch_size=args.batch_size,
            force=args.force,
            progress=lambda s, n=name: print(f"{n}: {s}", flush=True),
        )
        rows = result["rows"]
        print(f"\n{name}: {result['num_examples']} test images, mean over severities 1-5")
        print(
            f"{'corruption':16s} "
            + " ".join(
                f"{p + ' ' + m:>16s}" for p in ("robust", "detrimental") for m in ("FP", "DPTQ")
            )
        )
        for c in CORRUPTIONS:
            cells = []
            for pair in ("robust", "detrimental"):
                sel = [r for r in rows if r["corruption"] == c and r["pair"] == pair]
                for key in ("fp_accuracy", "dptq_accuracy"):
                    cells.append(f"{100 * np.mean([r[key] for r in sel]):16.2f}")
            print(f"{c:16s} " + " ".join(cells))


if __name__ == "__main__":
    main()
