"""The report's figures of the per-pair analyses (the corruption figures: ``corruption_plots``).

Each ``plot_*`` function draws one PNG of the report over all runs: bars and whiskers are the
mean and 95 % Student-t interval over runs (:func:`mean_half_width`), one colour per pair
(:data:`COLORS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis, plotting

__all__ = [
    "COLORS",
    "mean_half_width",
    "plot_drops",
    "plot_bit_histograms",
    "plot_class_bits",
    "plot_flip_margin",
    "plot_sensitivity",
]

#: The colour of each pair in every figure.
COLORS = {"robust": "tab:blue", "detrimental": "tab:red"}


def mean_half_width(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % t half-width of per-run values ``[R]`` (width 0 when R < 2): a whisker."""
    s = analysis.mean_ci(values)
    return s["mean"], (s["half_width"] if math.isfinite(s["half_width"]) else 0.0)


def plot_drops(results: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    """``accuracy_drops.png``: each pair's drop under its policy, uniform and random allocations.

    Args:
      results: run name -> pipeline ``results.json``; modes: the pairs to show; path: the PNG.
    """
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
            mean, half = mean_half_width(vals)
            ax.bar(
                i,
                mean,
                yerr=half if len(vals) > 1 else None,
                capsize=4,
                color=COLORS[mode],
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


def plot_bit_histograms(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    """``bit_histograms.png``: bits chosen per site, one panel per run and pair.

    Args:
      assess: run name -> :func:`~ptq_adversary.report.cache.assess_run` result; modes: the
        pairs to show; path: the PNG.
    """
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


def plot_class_bits(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    """``class_bits.png``: mean bits per true class and site, per run and pair.

    Args:
      assess: run name -> :func:`~ptq_adversary.report.cache.assess_run` result; modes: the
        pairs to show; path: the PNG.
    """
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


def plot_flip_margin(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    """``flip_vs_margin.png``: flip, change and FP-accuracy rates per FP-margin decile.

    Args:
      assess: run name -> :func:`~ptq_adversary.report.cache.assess_run` result; modes: the
        pairs to show; path: the PNG.
    """
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
            stats = [mean_half_width(vals[:, i]) for i in range(len(bins))]
            mean = np.asarray([s[0] for s in stats])
            half = np.asarray([s[1] for s in stats])
            ax.plot(bins, mean, style, marker="o", ms=3, color=COLORS[mode], label=label)
            if len(by) > 1:
                ax.fill_between(bins, mean - half, mean + half, color=COLORS[mode], alpha=0.15)
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


def plot_sensitivity(assess: Mapping[str, Any], modes: Sequence[str], path: str) -> None:
    """``sensitivity.png``: one-site-at-a-time drops of both networks.

    Args:
      assess: run name -> :func:`~ptq_adversary.report.cache.assess_run` result; modes: the
        pairs to show; path: the PNG.
    """
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
            stats = [mean_half_width(drops[:, site, k]) for site in range(len(sites))]
            x = np.arange(len(sites)) + (j - (len(shown) - 1) / 2) * width
            ax.bar(
                x,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats] if len(assess) > 1 else None,
                capsize=3,
                color=COLORS[mode],
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
