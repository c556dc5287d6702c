r"""Transitory points and layer-wise vulnerability of both pairs of every run.

  python experiments/assess.py --workdir=runs/seeds [--out=runs/seeds/report]

For every run in ``WORKDIR`` (a pipeline workdir, or ``seed_*/`` pipeline workdirs) computes
:func:`ptq_adversary.analysis.assess_pair` for both pairs on the test split: per-input FP margin,
confidence and DPTQ flips (flip rate per FP-margin decile and per class, concentration on low
margins), per-site bit histograms, mean bits per class and site, and the one-site-at-a-time
sensitivity of both networks (each site at each choice, the others at the highest; budget
ignored). Cached in ``OUT/<run>/assessment.json`` and ``OUT/<run>/per_input_<mode>.npz`` (the
files the report reads; ``--force`` recomputes); prints the headline of each analysis.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq_adversary import report  # noqa: E402

PAIRS = ("robust", "detrimental")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="default WORKDIR/report")
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = args.out or os.path.join(args.workdir, "report")
    for name, run_dir in report.find_runs(args.workdir).items():
        result = report.assess_run(
            run_dir, os.path.join(out, name), batch_size=args.batch_size, force=args.force
        )
        for mode in PAIRS:
            a = result["pairs"].get(mode)
            if a is None:
                continue
            conc = a["transitory"]["concentration"]["flips"]
            lw = a["layerwise"]
            print(
                f"{name} {mode}: FP {a['fp_accuracy']:.4f} DPTQ {a['dptq_accuracy']:.4f}; "
                f"flips {conc['num_flips']}/{conc['num_eligible']} FP-right inputs, "
                f"{100 * conc['share_lowest_10']:.1f}% of them in the lowest FP-margin decile, "
                f"AUROC(margin) {conc['auroc']:.3f}"
            )
            print(
                f"  modal allocation {lw['allocation']['modal_bits']} "
                f"({100 * lw['allocation']['modal_share']:.1f}%), "
                f"{lw['allocation']['num_distinct']} distinct; site mean bits "
                f"{[round(b, 2) for b in lw['site_mean_bits']]}"
            )
            sens = lw["sensitivity"]
            print(
                f"  site at {sens['lowest_bits']} bits, rest at {sens['reference_bits']}: drop "
                + ", ".join(
                    f"{s} {d:.2f}"
                    for s, d in zip(a["site_names"], sens["lowest_drop"], strict=True)
                )
                + " pts"
            )


if __name__ == "__main__":
    main()
