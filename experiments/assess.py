r"""Transitory points and layer-wise vulnerability of both pairs of every run.

  python experiments/assess.py --workdir=runs/seeds [--out=runs/seeds/report]

For every run in ``WORKDIR`` (a pipeline workdir, or ``seed_*/`` pipeline workdirs) computes
:func:`ptq_adversary.analysis.assess_pair` for both pairs on the test split: per-input FP margin,
confidence and DPTQ flips (flip rate per FP-margin decile and per class, concentration on low
margins), per-site bit histograms, mean bits per class and site, and the one-site-at-a-time
sensitivity of both networks (each site at each choice, the others at the highest; budget
ignored). Cached in ``OUT/<run>/assessment.json`` and ``OUT/<run>/per_input_<mode>.npz`` (the
files the report reads; ``--force`` recomputes); prints the headline of each analysis.

Runtime: about 46 min for the three seeds of ``experiments/seeds.py`` on the 2-core development
CPU, most of it the sensitivity probe; a progress bar on stderr counts the runs still to compute
(in fractions of a run: it moves after every batch) with rate and ETA.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq_adversary import report  # noqa: E402

PAIRS = ("robust", "detrimental")


def progress_bar(num_runs: int) -> tqdm.tqdm:
    """A bar over ``num_runs`` runs, advanced by fractions of a run, with rate and ETA.

    Like :func:`ptq_adversary.metrics.progress_bar` (sparse updates when stderr is not a
    terminal), but shows the fractional count with two decimals.
    """
    return tqdm.tqdm(
        total=num_runs,
        desc="assess",
        unit="run",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        smoothing=0.1,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.0f} runs "
        "[{elapsed}<{remaining}, {rate_fmt}]",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="default WORKDIR/report")
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = args.out or os.path.join(args.workdir, "report")
    runs = report.find_runs(args.workdir)
    todo = [
        name
        for name in runs
        if args.force or not os.path.exists(os.path.join(out, name, report.cache.ASSESSMENT))
    ]
    with progress_bar(len(todo)) as bar:
        for name, run_dir in runs.items():
            bar.set_description_str(f"assess {name}")
            result = report.assess_run(
                run_dir,
                os.path.join(out, name),
                batch_size=args.batch_size,
                force=args.force,
                advance=bar.update,
            )
            for line in headlines(name, result):
                bar.write(line)


def headlines(name: str, result: dict) -> list[str]:
    """The printed summary of one run's :func:`report.assess_run` result (three lines a pair)."""
    lines = []
    for mode in PAIRS:
        a = result["pairs"].get(mode)
        if a is None:
            continue
        conc = a["transitory"]["concentration"]["flips"]
        # NaN (no flips, or every eligible input flips) is stored as null in the JSON.
        share, auroc = (report.tables.float_or_nan(conc[k]) for k in ("share_lowest_10", "auroc"))
        lw = a["layerwise"]
        lines.append(
            f"{name} {mode}: FP {a['fp_accuracy']:.4f} DPTQ {a['dptq_accuracy']:.4f}; "
            f"flips {conc['num_flips']}/{conc['num_eligible']} FP-right inputs, "
            f"{100 * share:.1f}% of them in the lowest FP-margin decile, "
            f"AUROC(margin) {auroc:.3f}"
        )
        lines.append(
            f"  modal allocation {lw['allocation']['modal_bits']} "
            f"({100 * lw['allocation']['modal_share']:.1f}%), "
            f"{lw['allocation']['num_distinct']} distinct; site mean bits "
            f"{[round(b, 2) for b in lw['site_mean_bits']]}"
        )
        sens = lw["sensitivity"]
        lines.append(
            f"  site at {sens['lowest_bits']} bits, rest at {sens['reference_bits']}: drop "
            + ", ".join(
                f"{s} {d:.2f}" for s, d in zip(a["site_names"], sens["lowest_drop"], strict=True)
            )
            + " pts"
        )
    return lines


if __name__ == "__main__":
    main()
