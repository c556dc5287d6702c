"""The per-run analyses pooled over runs: the report's tables of pairs and corruptions.

:func:`pair_tables` turns the cached assessments of every run into the transitory-point and
layer-wise tables; :func:`corruption_stats` pools the corruption rows of every run by
(corruption, severity, pair), and :func:`corruption_tables` tabulates them. Each table is
written as CSV (:func:`~ptq_adversary.report.tables.write_table`) and returned as markdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis
from ptq_adversary.report import tables

__all__ = ["pair_tables", "corruption_stats", "corruption_tables"]


def pair_tables(assess: Mapping[str, Any], modes: Sequence[str], out: str) -> dict[str, str]:
    """The per-pair analysis tables over runs (markdown by name; CSVs written).

    Args:
      assess: run name -> :func:`~ptq_adversary.report.cache.assess_run` result.
      modes: the pairs to tabulate; out: the report directory (CSVs go there).

    Returns:
      markdown table by name: ``flip_by_margin``, ``flip_by_class``, ``concentration``,
      ``bit_histogram``, ``allocation`` and, when every run has the probe, ``sensitivity``
      (``class_mean_bits.csv`` and ``sensitivity.csv`` are written as CSV only).
    """
    md: dict[str, str] = {}
    runs = list(assess)
    first = assess[runs[0]]["pairs"][modes[0]]
    sites, choices, classes = first["site_names"], first["choices"], first["class_names"]

    rows = []
    for mode in modes:
        by = [assess[r]["pairs"][mode]["transitory"]["by_margin"] for r in runs]
        for i, b in enumerate(by[0]["bin"]):
            row = {
                "pair": mode,
                "decile": b,
                "margin_low": float(np.mean([x["low"][i] for x in by])),
                "margin_high": float(np.mean([x["high"][i] for x in by])),
            }
            for key in ("flip", "changed", "fp_correct", "q_correct"):
                s = analysis.mean_ci([100 * tables.float_or_nan(x[key][i]) for x in by])
                row[f"{key}_pct"], row[f"{key}_pct_ci95"] = s["mean"], s["half_width"]
            rows.append(row)
    md["flip_by_margin"] = tables.write_table(out, "flip_by_margin", rows)

    rows = []
    for mode in modes:
        tr = [assess[r]["pairs"][mode]["transitory"] for r in runs]
        for c, name in enumerate(classes):
            row = {"pair": mode, "class": c, "name": name}
            for key in ("flip", "changed"):
                s = analysis.mean_ci([100 * tables.float_or_nan(t["by_class"][key][c]) for t in tr])
                row[f"{key}_pct"], row[f"{key}_pct_ci95"] = s["mean"], s["half_width"]
            for key in ("fp", "q"):
                s = analysis.mean_ci([100 * t["prediction_share"][key][c] for t in tr])
                row[f"{key}_predicted_share_pct"] = s["mean"]
            rows.append(row)
    md["flip_by_class"] = tables.write_table(out, "flip_by_class", rows)

    rows = []
    stats = (
        ("flip_rate", "rate_pct", 100),
        ("share_lowest_10", "in_lowest10_pct", 100),
        ("share_lowest_20", "in_lowest20_pct", 100),
        ("share_lowest_50", "in_lowest50_pct", 100),
        ("lift_lowest_10", "lift_lowest10", 1),
        ("auroc", "auroc", 1),
        ("median_margin_flipped", "median_margin_event", 1),
        ("median_margin_kept", "median_margin_other", 1),
    )
    for mode in modes:
        for kind in ("flips", "flips_outside_dominant", "changes"):
            conc = [assess[r]["pairs"][mode]["transitory"]["concentration"][kind] for r in runs]
            row = {"pair": mode, "event": kind}
            for key, col, scale in stats:
                s = analysis.mean_ci([scale * tables.float_or_nan(c[key]) for c in conc])
                row[col], row[f"{col}_ci95"] = s["mean"], s["half_width"]
            rows.append(row)
    md["concentration"] = tables.write_table(out, "flip_concentration", rows)

    rows = []
    for r in runs:
        for mode in modes:
            hist = assess[r]["pairs"][mode]["layerwise"]["bit_histogram"]
            for site, name in enumerate(sites):
                rows.append(
                    {
                        "run": r,
                        "pair": mode,
                        "site": name,
                        **{f"{b}b": hist[site][k] for k, b in enumerate(choices)},
                        "mean_bits": assess[r]["pairs"][mode]["layerwise"]["site_mean_bits"][site],
                    }
                )
    md["bit_histogram"] = tables.write_table(out, "bit_histogram", rows)

    rows = []
    for r in runs:
        for mode in modes:
            grid = assess[r]["pairs"][mode]["layerwise"]["class_mean_bits"]
            for c, name in enumerate(classes):
                rows.append(
                    {
                        "run": r,
                        "pair": mode,
                        "class": name,
                        **{s: grid[c][i] for i, s in enumerate(sites)},
                    }
                )
    tables.write_table(out, "class_mean_bits", rows)  # in the CSV and the plot only

    rows = []
    for r in runs:
        for mode in modes:
            a = assess[r]["pairs"][mode]["layerwise"]["allocation"]
            rows.append(
                {
                    "run": r,
                    "pair": mode,
                    "distinct": a["num_distinct"],
                    "modal_bits": a["modal_bits"],
                    "modal_share": a["modal_share"],
                    "entropy_bits": a["entropy_bits"],
                    "class_info_fraction": a["class_information_fraction"],
                }
            )
    md["allocation"] = tables.write_table(out, "allocation", rows)

    rows = []
    for mode in modes:
        sens = [assess[r]["pairs"][mode]["layerwise"]["sensitivity"] for r in runs]
        if any(s is None for s in sens):
            continue
        for site, name in enumerate(sites):
            for k, b in enumerate(choices):
                acc = analysis.mean_ci([100 * s["accuracy"][site][k] for s in sens])
                drop = analysis.mean_ci([s["drop"][site][k] for s in sens])
                rows.append(
                    {
                        "network": mode,
                        "site": name,
                        "bits": b,
                        "accuracy_pct": acc["mean"],
                        "drop_pts": drop["mean"],
                        "drop_ci95": drop["half_width"],
                    }
                )
    if rows:
        tables.write_table(out, "sensitivity", rows)
        lowest = [r for r in rows if r["bits"] == min(choices)]
        md["sensitivity"] = tables.write_table(out, "sensitivity_lowest", lowest)
    return md


def corruption_tables(
    stats: Mapping[tuple, dict], modes: Sequence[str], out: str
) -> dict[str, str]:
    """``corruptions.csv`` (every setting) and the ``corruption_summary`` table (markdown).

    Args:
      stats: :func:`corruption_stats` of the runs; modes: the pairs; out: the report directory.

    Returns:
      ``{"corruption_summary": markdown}``: per corruption and pair, FP and DPTQ accuracy and
      drop averaged over severities 1-5 within each run, then mean ± interval over runs.
    """
    rows = []
    for (name, sev, mode), e in stats.items():
        row = {
            "corruption": name,
            "severity": sev,
            "param": e["param"],
            "unit": e["unit"],
            "pair": mode,
        }
        for m in ("fp_accuracy", "dptq_accuracy", "drop", "flip_rate", "allocation_change_rate"):
            scale = 1.0 if m == "drop" else 100.0
            s = analysis.mean_ci([scale * v for v in e[m]])
            row[m.replace("_accuracy", "_acc_pct").replace("_rate", "_pct")] = s["mean"]
            row[f"{m}_ci95"] = s["half_width"]
        rows.append(row)
    rows.sort(key=lambda r: (r["corruption"], r["pair"], r["severity"]))
    tables.write_table(out, "corruptions", rows)

    summary = []
    names = list(dict.fromkeys(k[0] for k in stats))
    for name in names:
        row = {"corruption": name}
        for mode in modes:
            per_sev = [stats[(name, s, mode)] for s in range(1, 6) if (name, s, mode) in stats]
            n_runs = len(per_sev[0]["fp_accuracy"])
            for m, label in (("fp_accuracy", "FP"), ("dptq_accuracy", "DPTQ"), ("drop", "drop")):
                scale = 1.0 if m == "drop" else 100.0
                # Mean over severities 1-5 within each run, then the interval over runs.
                per_run = [scale * np.mean([e[m][i] for e in per_sev]) for i in range(n_runs)]
                row[f"{mode} {label}"] = tables.ci_text(analysis.mean_ci(per_run))
        summary.append(row)
    return {"corruption_summary": tables.write_table(out, "corruption_summary", summary)}


def corruption_stats(corr: Mapping[str, Any]) -> dict[tuple[str, int, str], dict]:
    """(corruption, severity, pair) -> per-metric lists over runs; clean rows at severity 0.

    Args:
      corr: run name -> :func:`~ptq_adversary.report.cache.corrupt_run` result.

    Returns:
      ``(name, severity, pair) -> {"param", "unit", "family", metric: [R] values}`` for the
      metrics ``fp_accuracy``, ``dptq_accuracy``, ``drop``, ``flip_rate``,
      ``allocation_change_rate``; each run's clean row is severity 0 of every corruption.
    """
    out: dict[tuple[str, int, str], dict] = {}
    for c in corr.values():
        rows = c["rows"]
        names = [r["corruption"] for r in rows if r["corruption"] != "clean"]
        for r in rows:
            targets = [r["corruption"]]
            if r["corruption"] == "clean":  # severity 0 of every corruption
                targets = list(dict.fromkeys(names))
            for name in targets:
                key = (name, r["severity"], r["pair"])
                entry = out.setdefault(
                    key, {"param": r["param"], "unit": r["unit"], "family": r["family"]}
                )
                for m in (
                    "fp_accuracy",
                    "dptq_accuracy",
                    "drop",
                    "flip_rate",
                    "allocation_change_rate",
                ):
                    entry.setdefault(m, []).append(r[m])
    return out
