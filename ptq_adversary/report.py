r"""The assessment report: a pipeline workdir (or several seeds of one) -> report.md, CSV, PNG.

  python -m ptq_adversary.report --workdir=DIR [--out=DIR/report] [--no_corruptions]

``DIR`` is either one pipeline workdir (``DIR/results.json``, ``DIR/<mode>/best/``) or a seeds
workdir whose ``seed_*/`` sub-directories are pipeline workdirs (``experiments/seeds.py``). For
every run the analyses of :mod:`ptq_adversary.analysis` are computed once and cached under
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

The run analyses never write inside a run directory.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis, io, plotting

__all__ = [
    "find_runs",
    "assess_run",
    "corrupt_run",
    "write_table",
    "write_seeds_summary",
    "build_report",
    "main",
]

log = logging.getLogger(__name__)

_MODES = ("robust", "detrimental")
_COLORS = {"robust": "tab:blue", "detrimental": "tab:red"}


# ----------------------------------------------------------------------------------- runs
def find_runs(workdir: str) -> dict[str, str]:
    """The pipeline workdirs in ``workdir``: its ``seed_*/`` sub-directories, else itself.

    Returns:
      run name (``seed_0``, ... in numeric order, or the directory's base name) -> path, for
      the runs with a ``results.json``.

    Raises:
      FileNotFoundError: no finished run.
    """
    workdir = os.path.abspath(workdir)
    seeds = [
        d
        for d in glob.glob(os.path.join(workdir, "seed_*"))
        if os.path.exists(os.path.join(d, "results.json"))
    ]
    if seeds:
        key = lambda d: (int(m.group(1)) if (m := re.search(r"(\d+)$", d)) else 1 << 30, d)
        return {os.path.basename(d): d for d in sorted(seeds, key=key)}
    if os.path.exists(os.path.join(workdir, "results.json")):
        return {os.path.basename(workdir.rstrip("/")) or "run": workdir}
    raise FileNotFoundError(
        f"no finished pipeline run in {workdir}: need {workdir}/results.json or "
        f"{workdir}/seed_*/results.json"
    )


def _modes(run_dir: str) -> list[str]:
    results = io.read_json(os.path.join(run_dir, "results.json"))
    return [m for m in _MODES if m in results.get("pairs", {})]


def assess_run(
    run_dir: str,
    out_dir: str,
    *,
    dataset=None,
    batch_size: int = 1000,
    sensitivity: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Transitory and layer-wise analyses of every pair of a run, cached in ``out_dir``.

    Writes ``out_dir/assessment.json`` (``{"pairs": {mode: analysis.assess_pair(...)}}``
    without the per-input arrays) and ``out_dir/per_input_<mode>.npz`` (those arrays).

    Returns:
      The contents of ``assessment.json``.
    """
    path = os.path.join(out_dir, "assessment.json")
    if os.path.exists(path) and not force:
        return io.read_json(path)
    os.makedirs(out_dir, exist_ok=True)
    dataset = dataset if dataset is not None else analysis.load_run_dataset(run_dir)
    pairs = {}
    for mode in _modes(run_dir):
        t0 = time.perf_counter()
        result = analysis.assess_pair(
            run_dir, mode, dataset=dataset, batch_size=batch_size, sensitivity=sensitivity
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
    io.write_json_atomic(path, _jsonable(out))
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
    path = os.path.join(out_dir, "corruptions.json")
    if os.path.exists(path) and not force:
        return io.read_json(path)
    os.makedirs(out_dir, exist_ok=True)
    dataset = dataset if dataset is not None else analysis.load_run_dataset(run_dir)
    split = dataset.test
    if limit is not None:
        split = type(split)(images=split.images[:limit], labels=split.labels[:limit])
    pairs = {m: analysis.load_pair(run_dir, m) for m in _modes(run_dir)}
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
    io.write_json_atomic(path, _jsonable(out))
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN
    return x


# --------------------------------------------------------------------------------- tables
def write_table(
    out_dir: str, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """Writes ``rows`` to ``out_dir/name.csv`` and returns them as a markdown table.

    In the markdown, a column ``X`` followed by ``X_ci95`` (a 95 % half-width) shows as one
    ``mean ± half-width`` cell (the mean alone where the width is NaN, i.e. one run).
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    shown = [c for c in columns if not (c.endswith("_ci95") and c[:-5] in columns)]

    def cell(row, c):
        v, half = row.get(c), row.get(f"{c}_ci95")
        if f"{c}_ci95" in columns and isinstance(half, float) and math.isfinite(half):
            return f"{_md_value(v)} ± {_md_value(half)}"
        return _md_value(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, c) for c in shown) + " |")
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return "" if v is None else v


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.2f}"
    if isinstance(v, list | tuple):
        return "/".join(str(x) for x in v)
    return "" if v is None else str(v)


def _ci_text(s: Mapping[str, float], digits: int = 2) -> str:
    if s["n"] >= 2 and math.isfinite(s["half_width"]):
        return f"{s['mean']:.{digits}f} ± {s['half_width']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def write_seeds_summary(
    results_by_run: Mapping[str, Mapping[str, Any]], out_dir: str, confidence: float = 0.95
) -> dict[str, Any]:
    """Aggregates headline numbers over runs into ``seeds.json``, ``seeds.csv``, ``seeds.md``.

    Returns:
      :func:`analysis.aggregate_seeds` of the runs, plus ``markdown`` (the table).
    """
    agg = analysis.aggregate_seeds(results_by_run, confidence)
    runs = agg["seeds"]
    rows = []
    for name, m in agg["metrics"].items():
        rows.append(
            {
                "metric": name,
                "unit": m["unit"],
                "n": m["n"],
                "mean": m["mean"],
                "ci95_half_width": m["half_width"],
                "ci95_low": m["low"],
                "ci95_high": m["high"],
                "std": m["std"],
                **{r: m["values"][r] for r in runs},
                "mean ± 95% CI": _ci_text(m),
            }
        )
    os.makedirs(out_dir, exist_ok=True)
    table = write_table(
        out_dir,
        "seeds",
        rows,
        ["metric", "unit", "n", "mean", "ci95_half_width", "ci95_low", "ci95_high", "std", *runs],
    )
    md = write_table(out_dir, "seeds_display", rows, ["metric", "unit", "mean ± 95% CI", *runs])
    os.remove(os.path.join(out_dir, "seeds_display.csv"))  # seeds.csv holds the numbers
    io.write_json_atomic(os.path.join(out_dir, "seeds.json"), _jsonable(agg))
    header = (
        f"Headline numbers over {len(runs)} run(s) ({', '.join(runs)}): mean ± "
        f"{confidence:.0%} Student-t interval (n - 1 dof)."
    )
    io.write_text_atomic(os.path.join(out_dir, "seeds.md"), f"{header}\n\n{md}\n")
    del table
    return {**agg, "markdown": md}


# ---------------------------------------------------------------------------------- plots
def _stat(values: Sequence[float]) -> tuple[float, float]:
    s = analysis.mean_ci(values)
    return s["mean"], (s["half_width"] if math.isfinite(s["half_width"]) else 0.0)


def _plot_drops(results: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    kinds = (
        ("drop", "own policy\n(greedy)"),
        ("uniform_drop", "uniform\nallocation"),
        ("random_drop", "random feasible\nallocations"),
    )
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, (key, _) in enumerate(kinds):
            vals = [r["pairs"][mode][key] for r in results.values()]
            mean, half = _stat(vals)
            ax.bar(
                i,
                mean,
                yerr=half if len(vals) > 1 else None,
                capsize=4,
                color=_COLORS[mode],
                alpha=0.35 + 0.25 * (i == 0),
                edgecolor="black",
            )
            ax.scatter(
                np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)),
                vals,
                color="black",
                s=12,
                zorder=3,
                label="one seed" if i == 0 else None,
            )
            ax.annotate(
                f"{mean:.2f}",
                (i, mean + half),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
        ax.set_xticks(range(len(kinds)), [label for _, label in kinds])
        ax.set_ylabel("accuracy drop FP − DPTQ (points)")
        ax.set_title(f"{mode} pair")
        ax.axhline(0, color="grey", lw=0.8)
        ax.margins(y=0.12)
        ax.legend(loc="best", fontsize=8)
    n = len(results)
    fig.suptitle(
        f"Test-accuracy drop under DPTQ at the same bit budget "
        f"({n} seed{'s' if n > 1 else ''}; bars: mean"
        f"{', whiskers: 95% CI' if n > 1 else ''})"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_bit_histograms(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    runs = list(assess)
    fig, axes = plt.subplots(
        len(runs), len(modes), squeeze=False, figsize=(3.8 * len(modes), 2.3 * len(runs) + 0.8)
    )
    cmap = plt.get_cmap("viridis")
    for r, run in enumerate(runs):
        for c, mode in enumerate(modes):
            a = assess[run]["pairs"][mode]
            hist = np.asarray(a["layerwise"]["bit_histogram"])  # [L, K]
            choices, sites = a["choices"], a["site_names"]
            ax = axes[r, c]
            bottom = np.zeros(len(sites))
            for k, bits in enumerate(choices):
                ax.bar(
                    range(len(sites)),
                    hist[:, k],
                    bottom=bottom,
                    width=0.7,
                    color=cmap(k / max(len(choices) - 1, 1)),
                    edgecolor="white",
                    label=f"{bits} bits",
                )
                bottom += hist[:, k]
            mean_bits = a["layerwise"]["site_mean_bits"]
            for i, mb in enumerate(mean_bits):
                ax.text(i, 1.02, f"{mb:.2f}", ha="center", fontsize=7)
            ax.set_xticks(range(len(sites)), sites)
            ax.set_ylim(0, 1.12)
            ax.set_ylabel("fraction of test inputs")
            ax.set_title(f"{run}: {mode} policy", fontsize=9)
            if r == len(runs) - 1:
                ax.set_xlabel("quantization site (number above: mean bits)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("Bits chosen per site by the greedy policy on the test set")
    fig.tight_layout()
    fig.legend(
        handles[::-1],
        labels[::-1],
        loc="center left",
        fontsize=8,
        title="choice",
        bbox_to_anchor=(1.0, 0.5),
    )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_class_bits(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    runs = list(assess)
    first = assess[runs[0]]["pairs"][modes[0]]
    choices = first["choices"]
    fig, axes = plt.subplots(
        len(runs),
        len(modes),
        squeeze=False,
        layout="constrained",
        figsize=(3.4 * len(modes) + 1.8, 2.7 * len(runs) + 0.5),
    )
    for r, run in enumerate(runs):
        for c, mode in enumerate(modes):
            a = assess[run]["pairs"][mode]
            grid = np.asarray(a["layerwise"]["class_mean_bits"], np.float64)  # [C, L]
            ax = axes[r, c]
            im = ax.imshow(
                grid, cmap="viridis", vmin=min(choices), vmax=max(choices), aspect="auto"
            )
            for (i, j), v in np.ndenumerate(grid):
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < np.mean(choices) else "black",
                )
            ax.set_xticks(range(len(a["site_names"])), a["site_names"])
            ax.set_yticks(
                range(len(a["class_names"])), a["class_names"] if c == 0 else [], fontsize=7
            )
            info = a["layerwise"]["allocation"]
            ax.set_title(
                f"{run}: {mode}\n({info['num_distinct']} distinct allocation"
                f"{'s' if info['num_distinct'] != 1 else ''})",
                fontsize=8,
            )
            if r == len(runs) - 1:
                ax.set_xlabel("quantization site")
    fig.colorbar(im, ax=axes, label="mean bits over the class's test inputs", shrink=0.8)
    fig.suptitle("Input dependence of the allocation: mean bits per true class and site")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_flip_margin(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(4.4 * len(modes), 3.6), squeeze=False)
    series = (
        ("flip", "FP right → DPTQ wrong", "-"),
        ("changed", "prediction changed", "--"),
        ("fp_correct", "FP accuracy", ":"),
    )
    for ax, mode in zip(axes[0], modes, strict=True):
        by = [a["pairs"][mode]["transitory"]["by_margin"] for a in assess.values()]
        bins = np.asarray(by[0]["bin"])
        for key, label, style in series:
            vals = np.asarray([b[key] for b in by], np.float64) * 100  # [runs, bins]
            stats = [_stat(vals[:, i]) for i in range(len(bins))]
            mean = np.asarray([s[0] for s in stats])
            half = np.asarray([s[1] for s in stats])
            ax.plot(bins, mean, style, marker="o", ms=3, color=_COLORS[mode], label=label)
            if len(by) > 1:
                ax.fill_between(bins, mean - half, mean + half, color=_COLORS[mode], alpha=0.15)
        high = np.mean([b["high"] for b in by], axis=0)
        ax.set_xticks(bins, [f"{b}\n≤{h:.1f}" for b, h in zip(bins, high, strict=True)], fontsize=7)
        ax.set_xlabel(
            "FP margin decile (1 = smallest top-1 − top-2 logit gap)\n"
            "tick: decile, its upper edge (logits)"
        )
        ax.set_ylabel("% of test inputs in the decile")
        ax.set_ylim(-3, 103)
        ax.set_title(f"{mode} pair")
        ax.legend(fontsize=7, loc="center right")
    n = len(assess)
    fig.suptitle(
        f"Where DPTQ flips predictions: rate per FP-margin decile "
        f"({n} seed{'s' if n > 1 else ''}{'; band: 95% CI' if n > 1 else ''})"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_sensitivity(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    first = assess[next(iter(assess))]["pairs"][modes[0]]
    sites, choices = first["site_names"], first["choices"]
    shown = [k for k in range(len(choices)) if choices[k] < max(choices)][:3]  # lowest three
    fig, axes = plt.subplots(1, len(modes), figsize=(4.4 * len(modes), 3.6), squeeze=False)
    width = 0.8 / len(shown)
    for ax, mode in zip(axes[0], modes, strict=True):
        drops = np.asarray(
            [a["pairs"][mode]["layerwise"]["sensitivity"]["drop"] for a in assess.values()],
            np.float64,
        )  # [runs, L, K]
        for j, k in enumerate(shown):
            stats = [_stat(drops[:, site, k]) for site in range(len(sites))]
            x = np.arange(len(sites)) + (j - (len(shown) - 1) / 2) * width
            ax.bar(
                x,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats] if len(assess) > 1 else None,
                capsize=3,
                color=_COLORS[mode],
                alpha=1.0 - 0.3 * j,
                edgecolor="black",
                label=f"site at {choices[k]} bits",
            )
        ref = np.mean(
            [
                a["pairs"][mode]["layerwise"]["sensitivity"]["reference_accuracy"]
                for a in assess.values()
            ]
        )
        ax.set_xticks(range(len(sites)), sites)
        ax.set_xlabel(f"quantized site (all other sites at {max(choices)} bits)")
        ax.set_ylabel(f"accuracy drop vs all-{max(choices)}-bit (points)")
        ax.set_title(f"{mode} network (all {max(choices)} bits: {100 * ref:.2f}%)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    n = len(assess)
    fig.suptitle(
        f"One-site-at-a-time sensitivity, budget ignored "
        f"({n} seed{'s' if n > 1 else ''}{'; whiskers: 95% CI' if n > 1 else ''})"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _corruption_stats(corr: Mapping[str, Any]) -> dict[tuple[str, int, str], dict]:
    """(corruption, severity, pair) -> per-metric lists over runs; clean rows at severity 0."""
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


def _plot_corruptions(
    stats: Mapping[tuple, dict], modes: Sequence[str], n_runs: int, path: str
) -> None:
    plt = plotting.pyplot()
    names = list(dict.fromkeys(k[0] for k in stats))
    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows + 0.6), squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, names, strict=False):
        sev = sorted({k[1] for k in stats if k[0] == name})
        for mode in modes:
            for metric, style, label in (
                ("fp_accuracy", "-", "FP"),
                ("dptq_accuracy", "--", "DPTQ"),
            ):
                s = [_stat(np.asarray(stats[(name, v, mode)][metric]) * 100) for v in sev]
                mean, half = np.asarray([x[0] for x in s]), np.asarray([x[1] for x in s])
                ax.plot(
                    sev, mean, style, marker="o", ms=3, color=_COLORS[mode], label=f"{mode} {label}"
                )
                if n_runs > 1:
                    ax.fill_between(sev, mean - half, mean + half, color=_COLORS[mode], alpha=0.12)
        unit = stats[(name, sev[-1], modes[0])]["unit"]
        params = [stats[(name, v, modes[0])]["param"] for v in sev if v > 0]
        ax.set_title(f"{name}\n{unit}: {', '.join(f'{p:g}' for p in params)}", fontsize=8)
        ax.set_xticks(sev)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("severity (0 = clean)")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 1.0)
    )
    fig.suptitle(
        f"Accuracy under corruptions, FP and greedy DPTQ ({n_runs} seed"
        f"{'s' if n_runs > 1 else ''}{'; band: 95% CI' if n_runs > 1 else ''})",
        y=0.965,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)


def _plot_corruption_drops(stats: Mapping[tuple, dict], modes: Sequence[str], path: str) -> None:
    plt = plotting.pyplot()
    names = list(dict.fromkeys(k[0] for k in stats))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(modes), figsize=(4.8 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, name in enumerate(names):
            sev = sorted({k[1] for k in stats if k[0] == name})
            mean = [np.mean(stats[(name, v, mode)]["drop"]) for v in sev]
            ax.plot(
                sev, mean, marker="o", ms=3, color=cmap(i), label=name, ls="-" if i < 10 else "--"
            )
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("DPTQ drop FP − DPTQ (points)")
        ax.set_title(f"{mode} pair")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    n = len(next(iter(stats.values()))["drop"])
    fig.suptitle(
        f"Drop caused by the pair's own DPTQ policy under corruption "
        f"({'mean over ' + str(n) + ' seeds' if n > 1 else '1 seed'})"
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_corruption_examples(
    image_hwc: np.ndarray, names: Sequence[str], path: str, seed: int = 0
) -> None:
    """One raw image (float ``[H, W, C]`` in [0, 1]) under corruptions ``names``, severities 0-5."""
    import jax

    from ptq_adversary import corruptions

    plt = plotting.pyplot()
    sev = range(corruptions.MAX_SEVERITY + 1)
    fig, axes = plt.subplots(
        len(sev), len(names), squeeze=False, figsize=(1.05 * len(names) + 0.8, 1.1 * len(sev) + 0.6)
    )
    for j, name in enumerate(names):
        for s in sev:
            out = np.asarray(corruptions.apply(name, jax.random.PRNGKey(seed), image_hwc[None], s))[
                0
            ]
            ax = axes[s, j]
            ax.imshow(out[..., 0] if out.shape[-1] == 1 else out, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if s == 0:
                ax.set_title(name.replace("_", "\n"), fontsize=7)
            if j == 0:
                ax.set_ylabel(f"severity {s}", fontsize=7)
    fig.suptitle("Corruptions of one test image (pixel scale, before normalisation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------- report
def _pairs_tables(assess: Mapping[str, Any], modes: Sequence[str], out: str) -> dict[str, str]:
    """The per-pair analysis tables over runs (markdown by name; CSVs written)."""
    tables: dict[str, str] = {}
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
                s = analysis.mean_ci([100 * _nan(x[key][i]) for x in by])
                row[f"{key}_pct"], row[f"{key}_pct_ci95"] = s["mean"], s["half_width"]
            rows.append(row)
    tables["flip_by_margin"] = write_table(out, "flip_by_margin", rows)

    rows = []
    for mode in modes:
        tr = [assess[r]["pairs"][mode]["transitory"] for r in runs]
        for c, name in enumerate(classes):
            row = {"pair": mode, "class": c, "name": name}
            for key in ("flip", "changed"):
                s = analysis.mean_ci([100 * _nan(t["by_class"][key][c]) for t in tr])
                row[f"{key}_pct"], row[f"{key}_pct_ci95"] = s["mean"], s["half_width"]
            for key in ("fp", "q"):
                s = analysis.mean_ci([100 * t["prediction_share"][key][c] for t in tr])
                row[f"{key}_predicted_share_pct"] = s["mean"]
            rows.append(row)
    tables["flip_by_class"] = write_table(out, "flip_by_class", rows)

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
                s = analysis.mean_ci([scale * _nan(c[key]) for c in conc])
                row[col], row[f"{col}_ci95"] = s["mean"], s["half_width"]
            rows.append(row)
    tables["concentration"] = write_table(out, "flip_concentration", rows)

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
    tables["bit_histogram"] = write_table(out, "bit_histogram", rows)

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
    write_table(out, "class_mean_bits", rows)  # in the CSV and the plot only

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
    tables["allocation"] = write_table(out, "allocation", rows)

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
        write_table(out, "sensitivity", rows)
        lowest = [r for r in rows if r["bits"] == min(choices)]
        tables["sensitivity"] = write_table(out, "sensitivity_lowest", lowest)
    return tables


def _corruption_tables(
    stats: Mapping[tuple, dict], modes: Sequence[str], out: str
) -> dict[str, str]:
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
    write_table(out, "corruptions", rows)

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
                row[f"{mode} {label}"] = _ci_text(analysis.mean_ci(per_run))
        summary.append(row)
    return {"corruption_summary": write_table(out, "corruption_summary", summary)}


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
) -> str:
    """Computes (or reuses) every run's analyses and writes the report.

    Args:
      workdir: a pipeline workdir or a seeds workdir (``seed_*/``), see :func:`find_runs`.
      out: output directory (default ``workdir/report``).
      corruptions: run and report the corruption evaluation.
      corruption_limit: evaluate corruptions on the first this many test images (all if None).
      corruption_names: corruptions to evaluate (default: every registered one).
      sensitivity: run the one-site-at-a-time probe.
      batch_size: evaluation batch size.
      force: recompute cached analyses.
      dataset_fn: run dir -> dataset (default: :func:`analysis.load_run_dataset`; tests pass
        a synthetic one).

    Returns:
      The path of ``report.md``.
    """
    runs = find_runs(workdir)
    out = os.path.abspath(out or os.path.join(workdir, "report"))
    os.makedirs(out, exist_ok=True)
    dataset_fn = dataset_fn or analysis.load_run_dataset
    results = {name: io.read_json(os.path.join(d, "results.json")) for name, d in runs.items()}
    modes = [m for m in _MODES if all(m in r.get("pairs", {}) for r in results.values())]
    assess, corr = {}, {}
    for name, run_dir in runs.items():
        dataset = None
        cached = os.path.exists(os.path.join(out, name, "assessment.json"))
        if force or not cached:
            dataset = dataset_fn(run_dir)
        assess[name] = assess_run(
            run_dir,
            os.path.join(out, name),
            dataset=dataset,
            batch_size=batch_size,
            sensitivity=sensitivity,
            force=force,
        )
        if corruptions:
            cached = os.path.exists(os.path.join(out, name, "corruptions.json"))
            if dataset is None and (force or not cached):
                dataset = dataset_fn(run_dir)
            corr[name] = corrupt_run(
                run_dir,
                os.path.join(out, name),
                dataset=dataset,
                names=corruption_names,
                limit=corruption_limit,
                batch_size=batch_size,
                force=force,
                progress=lambda s, n=name: log.info("%s: %s", n, s),
            )

    seeds = write_seeds_summary(results, out)
    tables = _pairs_tables(assess, modes, out)
    _plot_drops(results, modes, os.path.join(out, "accuracy_drops.png"))
    _plot_bit_histograms(assess, modes, os.path.join(out, "bit_histograms.png"))
    _plot_class_bits(assess, modes, os.path.join(out, "class_bits.png"))
    _plot_flip_margin(assess, modes, os.path.join(out, "flip_vs_margin.png"))
    if all(a["pairs"][m]["layerwise"]["sensitivity"] for a in assess.values() for m in modes):
        _plot_sensitivity(assess, modes, os.path.join(out, "sensitivity.png"))
    if corr:
        stats = _corruption_stats(corr)
        tables.update(_corruption_tables(stats, modes, out))
        _plot_corruptions(stats, modes, len(corr), os.path.join(out, "corruptions.png"))
        _plot_corruption_drops(stats, modes, os.path.join(out, "corruption_drops.png"))
        first_run = next(iter(runs.values()))
        ds = dataset_fn(first_run)
        _plot_corruption_examples(
            ds.test.images[0].astype(np.float32) / 255.0,
            list(dict.fromkeys(k[0] for k in stats)),
            os.path.join(out, "corruption_examples.png"),
        )
    text = _markdown(workdir, runs, results, assess, corr, seeds, tables, modes, out)
    path = os.path.join(out, "report.md")
    io.write_text_atomic(path, text)
    return path


def _markdown(workdir, runs, results, assess, corr, seeds, tables, modes, out) -> str:
    first = next(iter(results.values()))
    n = len(runs)
    a0 = assess[next(iter(assess))]["pairs"][modes[0]]
    lines = [
        "# DPTQ assessment report",
        "",
        f"Made by `python -m ptq_adversary.report --workdir={_rel(workdir)}` from {n} "
        f"pipeline run(s) ({', '.join(runs)}): {first['dataset']}, student "
        f"`{first['student_model']}`, teacher `{first['teacher_model']}`, budget "
        f"{first['budget']:g} mean bits over {first['choices']}, test split "
        f"({a0['num_examples']} images). Across runs: mean ± 95 % Student-t interval "
        "(n - 1 dof); with one run, the value. Every table is also a CSV next to this file.",
        "",
        "## Summary (computed from the tables below)",
        "",
        *_findings(seeds, assess, corr, modes),
        "",
        "## Headline numbers",
        "",
        seeds["markdown"],
        "",
        "`drop`: FP minus DPTQ test accuracy in points, under the pair's own greedy policy; "
        "`uniform`/`random`: the same network under the uniform allocation / random feasible "
        "allocations at the same budget; `flip_rate`: inputs FP gets right and DPTQ wrong; "
        "`max_fp_gap`: largest FP accuracy gap among the student and the pairs.",
        "",
        "![accuracy drops](accuracy_drops.png)",
        "",
        "## Transitory points: which inputs flip",
        "",
        "Flip rate per decile of the FP margin (top-1 minus top-2 logit; decile 1 = smallest), "
        "in % of the inputs of the decile:",
        "",
        tables["flip_by_margin"],
        "",
        "![flip rate vs margin](flip_vs_margin.png)",
        "",
        "How concentrated the events are on low FP margins. `flips`: FP-right inputs that "
        "DPTQ gets wrong, among the FP-right inputs, against the true-class margin; "
        "`flips_outside_dominant`: the same without the inputs of the class DPTQ predicts "
        "most often (a collapse onto one class cannot flip that class's own inputs); "
        "`changes`: any change of the predicted class, among all inputs, against the top-1 − "
        "top-2 margin. `rate_pct`: events per eligible input; `in_lowestQ_pct`: % of the "
        "events that fall in the Q % lowest-margin eligible inputs (Q if the margin did not "
        "matter); `lift_lowest10`: event rate in the lowest decile over the overall rate; "
        "`auroc`: probability that an event input has a lower margin than a non-event one "
        "(0.5: no relation; below 0.5: events sit on *high* margins); medians in logits:",
        "",
        tables["concentration"],
        "",
        "Per true class (rates within the class, %; `*_predicted_share_pct`: share of all "
        "inputs predicted as the class in FP / under DPTQ):",
        "",
        tables["flip_by_class"],
        "",
        "## Layer-wise: which bits where, and which sites matter",
        "",
        tables["bit_histogram"],
        "",
        "![bit histograms](bit_histograms.png)",
        "",
        "Allocations used on the test set (`class_info_fraction`: mutual information between "
        "the true class and the allocation over the allocation's entropy; 0 = the allocation "
        "does not depend on the class):",
        "",
        tables["allocation"],
        "",
        "![class bits](class_bits.png)",
        "",
    ]
    if "sensitivity" in tables:
        lines += [
            "One-site-at-a-time sensitivity (budget ignored): one site at the lowest choice, "
            "every other site at the highest; drop in points against all sites at the highest "
            "(all choices in `sensitivity.csv`):",
            "",
            tables["sensitivity"],
            "",
            "![sensitivity](sensitivity.png)",
            "",
        ]
    if corr:
        c0 = corr[next(iter(corr))]
        lines += [
            "## Corruptions and transforms",
            "",
            f"Test images ({c0['num_examples']} per run) corrupted on the pixel scale, then "
            "normalised; the policy sees the corrupted image and picks its allocation for it. "
            "Mean over severities 1-5 (accuracy in %, drop in points; every severity in "
            "`corruptions.csv`):",
            "",
            tables["corruption_summary"],
            "",
            "![corruptions](corruptions.png)",
            "",
            "![corruption drops](corruption_drops.png)",
            "",
            "![corruption examples](corruption_examples.png)",
            "",
        ]
    lines += [
        "Files: "
        + ", ".join(sorted(f for f in os.listdir(out) if f.endswith((".csv", ".png", ".json")))),
        "",
    ]
    return "\n".join(lines)


def _findings(seeds, assess, corr, modes) -> list[str]:
    """Bullet points with the key numbers of the report (all computed, nothing typed in)."""
    m = seeds["metrics"]
    runs = list(assess)
    out = []
    for mode in modes:
        out.append(
            f"- **{mode} pair**: FP {_ci_text(m[f'{mode}_fp_acc'])} %, DPTQ "
            f"{_ci_text(m[f'{mode}_dptq_acc'])} %, drop {_ci_text(m[f'{mode}_drop'])} points "
            f"(uniform allocation {_ci_text(m[f'{mode}_uniform_drop'])}, random feasible "
            f"allocations {_ci_text(m[f'{mode}_random_drop'])})."
        )
    for mode in modes:
        tr = [assess[r]["pairs"][mode]["transitory"] for r in runs]
        conc = [t["concentration"]["flips"] for t in tr]
        outside = [t["concentration"]["flips_outside_dominant"] for t in tr]
        ci = lambda vals, scale=100.0: _ci_text(analysis.mean_ci([scale * _nan(v) for v in vals]))
        out.append(
            f"- **{mode} flips**: {ci([c['flip_rate'] for c in conc])} % of FP-right inputs "
            f"flip; {ci([c['share_lowest_10'] for c in conc])} % of the flips lie in the "
            f"lowest FP-margin decile (AUROC of the margin "
            f"{ci([c['auroc'] for c in conc], 1.0)}); DPTQ puts "
            f"{ci([t['dominant_share'] for t in tr])} % of all inputs in one class; outside "
            f"that class {ci([c['flip_rate'] for c in outside])} % of FP-right inputs flip "
            f"(AUROC {ci([c['auroc'] for c in outside], 1.0)})."
        )
    for mode in modes:
        lw = [assess[r]["pairs"][mode]["layerwise"] for r in runs]
        sites = assess[runs[0]]["pairs"][mode]["site_names"]
        alloc = "; ".join(
            f"{r}: {'/'.join(map(str, w['allocation']['modal_bits']))} on "
            f"{100 * w['allocation']['modal_share']:.0f} % of inputs"
            for r, w in zip(runs, lw, strict=True)
        )
        text = f"- **{mode} policy** (bits on {'/'.join(sites)}): {alloc}."
        if all(w["sensitivity"] for w in lw):
            drops = np.asarray([w["sensitivity"]["lowest_drop"] for w in lw])  # [runs, L]
            order = np.argsort(-drops.mean(0))
            low = lw[0]["sensitivity"]["lowest_bits"]
            text += (
                f" One site at {low} bits (rest at {lw[0]['sensitivity']['reference_bits']}) "
                f"costs the {mode} network "
                + ", ".join(f"{sites[i]} {_ci_text(analysis.mean_ci(drops[:, i]))}" for i in order)
                + " points."
            )
        out.append(text)
    if corr:
        stats = _corruption_stats(corr)
        for mode in modes:
            keys = [k for k in stats if k[2] == mode and k[1] > 0]
            drop = {k: float(np.mean(stats[k]["drop"])) for k in keys}
            q = {k: 100 * float(np.mean(stats[k]["dptq_accuracy"])) for k in keys}
            worst = max(keys, key=lambda k: drop[k])
            best_q = max(keys, key=lambda k: q[k])
            out.append(
                f"- **{mode} under corruptions** ({len(keys)} corruption x severity settings): "
                f"DPTQ drop from {min(drop.values()):.2f} to {max(drop.values()):.2f} points "
                f"(largest: {worst[0]} severity {worst[1]}); DPTQ accuracy from "
                f"{min(q.values()):.1f} to {max(q.values()):.1f} % (highest: {best_q[0]} "
                f"severity {best_q[1]}, where FP is "
                f"{100 * float(np.mean(stats[best_q]['fp_accuracy'])):.1f} %)."
            )
    return out


def _rel(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def main(argv: Sequence[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        path = build_report(
            args.workdir,
            args.out,
            corruptions=not args.no_corruptions,
            corruption_limit=args.corruption_limit,
            sensitivity=not args.no_sensitivity,
            batch_size=args.batch_size,
            force=args.force,
        )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
