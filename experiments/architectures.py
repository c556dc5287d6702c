"""The architecture table: the pipeline's pairs, audits and sensitivity, one row per student.

  python experiments/architectures.py \
      --arch cnn=runs/seeds:runs/audit --arch resnet20=runs/fmnist_resnet20:runs/audit_resnet20 \
      --out experiments/results/architectures

Each ``--arch NAME=PIPELINES:AUDITS`` names a pipeline workdir (or a directory of ``seed_*/``
pipeline workdirs: mean ± 95 % Student-t interval over them) and a directory holding the audits
``student/``, ``robust/`` and ``detrimental/`` (``configs/audit.py`` workdirs) of its first
seed. The sensitivity comes from ``experiments/assess.py``'s ``<pipelines>/report/<run>/
assessment.json``.

Columns:

* FP: FP test accuracy of the robust / detrimental pair;
* DPTQ: accuracy under the pair's own policy;
* drop: the pair's drop in points, with the uniform and random allocations' drops on the same
  network;
* audit: per network (student, robust, detrimental) the worst-case bracket [certified, found]
  on the audited test images (exhaustive enumeration's exact value where it ran), and the
  best search (lowest accuracy among random search, greedy and beam);
* sensitivity: per network, the site whose drop is largest with it alone at the lowest bits
  (others at the highest), and how many sites drop more than 1 point;
* policy: how many distinct allocations the pair's greedy policy gives the test images, and
  the share of the most common one (its bits are in the JSON).

Writes ``OUT/architectures.md``, ``OUT/architectures.json`` and ``OUT/sensitivity.csv`` (every
site's lowest-bit drop).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq_adversary import io, report  # noqa: E402

PAIRS = ("robust", "detrimental")
NETWORKS = ("student", *PAIRS)
SEARCHES = ("random_search", "greedy", "beam")
#: Two-sided 95 % Student-t quantiles by degrees of freedom.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78}


def _mean_ci(values: list[float]) -> tuple[float, float | None]:
    if len(values) < 2:
        return values[0], None
    return statistics.mean(values), T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(
        len(values)
    )


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, ci = _mean_ci([scale * v for v in values])
    return f"{mean:.{digits}f}" + ("" if ci is None else f" ± {ci:.{digits}f}")


def _audit_cell(audit: dict[str, Any]) -> dict[str, Any]:
    methods = audit["methods"]
    if "certify" in methods:
        lo, hi = methods["certify"]["certified_accuracy"], methods["certify"]["accuracy"]
    elif "exhaustive" in methods:
        lo = hi = methods["exhaustive"]["accuracy"]
    else:
        lo, hi = None, min(m["accuracy"] for m in methods.values())
    searches = {k: methods[k]["accuracy"] for k in SEARCHES if k in methods}
    best = min(searches, key=searches.get) if searches else None
    return {
        "fp": audit["fp_accuracy"], "certified": lo, "found": hi, "best_search": best,
        "best_search_accuracy": searches.get(best), "num_examples": audit["num_examples"],
    }  # fmt: skip


def _sens_cell(assessment: dict[str, Any], mode: str) -> dict[str, Any]:
    pair = assessment["pairs"][mode]
    sens = pair["layerwise"]["sensitivity"]
    drops = dict(zip(pair["site_names"], sens["lowest_drop"], strict=True))
    top = max(drops, key=drops.get)
    alloc = pair["layerwise"]["allocation"]
    return {
        "policy_distinct": alloc["num_distinct"], "policy_modal_share": alloc["modal_share"],
        "policy_modal_bits": alloc["modal_bits"],
        "lowest_bits": sens["lowest_bits"], "drops": drops, "top_site": top,
        "top_drop": drops[top], "sites_over_1pt": sum(d > 1.0 for d in drops.values()),
    }  # fmt: skip


def collect(name: str, pipelines: str, audits: str) -> dict[str, Any]:
    runs = report.find_runs(pipelines)
    results = {run: io.read_json(os.path.join(d, "results.json")) for run, d in runs.items()}
    first = next(iter(runs))
    row: dict[str, Any] = {"arch": name, "runs": list(runs), "student_model":
                           results[first]["student_model"]}  # fmt: skip
    row["num_sites"] = len(results[first]["pairs"]["robust"]["site_names"])
    row["student_accuracy"] = [r["student"]["test_accuracy"] for r in results.values()]
    for mode in PAIRS:
        pr = [r["pairs"][mode] for r in results.values()]
        row[mode] = {k: [p[k] for p in pr] for k in ("fp_accuracy", "dptq_accuracy", "drop",
                                                     "uniform_drop", "random_drop")}  # fmt: skip
    row["time_s"] = {run: r.get("time_s") for run, r in results.items()}
    row["audit"] = {}
    for net in NETWORKS:
        path = os.path.join(audits, net, "audit.json")
        row["audit"][net] = _audit_cell(io.read_json(path)) if os.path.exists(path) else None
    path = os.path.join(pipelines, "report", first, "assessment.json")
    assessment = io.read_json(path) if os.path.exists(path) else None
    row["sensitivity"] = {
        mode: _sens_cell(assessment, mode) if assessment else None for mode in PAIRS
    }
    return row


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| student (sites, seeds) | pair | FP % | DPTQ % | drop (uniform, random) pts | "
        "audit: worst case [certified, found] %, best search | sensitivity: worst site "
        "(drop pts), sites > 1 pt | policy: distinct allocations, modal share |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        label = f"{row['student_model']} ({row['num_sites']}, {len(row['runs'])})"
        audit = row["audit"].get("student")
        lines.append(
            f"| {label} | student | {_fmt(row['student_accuracy'], 100)} | | | "
            f"{_audit_text(audit)} | | |"
        )
        for mode in PAIRS:
            p = row[mode]
            s = row["sensitivity"][mode]
            sens = "-" if s is None else (
                f"{s['top_site']} ({s['top_drop']:.1f}), {s['sites_over_1pt']}"
            )  # fmt: skip
            pol = "-" if s is None else (
                f"{s['policy_distinct']}, {100 * s['policy_modal_share']:.1f} %"
            )  # fmt: skip
            lines.append(
                f"| | {mode} | {_fmt(p['fp_accuracy'], 100)} | {_fmt(p['dptq_accuracy'], 100)} | "
                f"{_fmt(p['drop'])} ({_fmt(p['uniform_drop'])}, {_fmt(p['random_drop'])}) | "
                f"{_audit_text(row['audit'].get(mode))} | {sens} | {pol} |"
            )
    return "\n".join(lines)


def _audit_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    search = (
        f"; {cell['best_search']} {_pct(cell['best_search_accuracy'])}"
        if cell["best_search"] else ""
    )  # fmt: skip
    return (
        f"[{_pct(cell['certified'])}, {_pct(cell['found'])}] of FP {_pct(cell['fp'])} "
        f"({cell['num_examples']} images){search}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", required=True,
                        help="NAME=PIPELINES:AUDITS")  # fmt: skip
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.arch:
        name, _, dirs = spec.partition("=")
        pipelines, _, audits = dirs.partition(":")
        if not (name and pipelines and audits):
            parser.error(f"--arch {spec!r}: expected NAME=PIPELINES:AUDITS")
        rows.append(collect(name, pipelines, audits))
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows)
    text = (
        "# Architectures: the pipeline, its audits and sensitivity per student\n\n"
        "Command: `python experiments/architectures.py "
        + " ".join(f"--arch {a}" for a in args.arch)
        + f" --out {args.out}`\n\n{table}\n"
    )
    with open(os.path.join(args.out, "architectures.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "architectures.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "sensitivity.csv"), "w", encoding="utf-8") as f:
        f.write("arch,pair,site,lowest_bits,drop_points\n")
        for row in rows:
            for mode, s in row["sensitivity"].items():
                for site, d in (s or {}).get("drops", {}).items():
                    f.write(f"{row['arch']},{mode},{site},{s['lowest_bits']},{d:.4f}\n")
    print(text)


if __name__ == "__main__":
    main()
