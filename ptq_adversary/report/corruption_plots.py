"""The report's figures of the corruption evaluation.

Every ``plot_*`` function takes the pooled rows of
:func:`~ptq_adversary.report.aggregate.corruption_stats` (except
:func:`plot_corruption_examples`, which draws the corruptions themselves) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from ptq_adversary import corruptions, plotting
from ptq_adversary.report import plots

__all__ = ["plot_corruptions", "plot_corruption_drops", "plot_corruption_examples"]


def plot_corruptions(
    stats: Mapping[tuple, dict], modes: Sequence[str], n_runs: int, path: str
) -> None:
    """``corruptions.png``: FP and DPTQ accuracy vs severity, one panel per corruption.

    Args:
      stats: :func:`~ptq_adversary.report.aggregate.corruption_stats` of the runs.
      modes: the pairs to show; n_runs: the number of runs (bands for more than one).
      path: the PNG.
    """
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
                s = [
                    plots.mean_half_width(np.asarray(stats[(name, v, mode)][metric]) * 100)
                    for v in sev
                ]
                mean, half = np.asarray([x[0] for x in s]), np.asarray([x[1] for x in s])
                ax.plot(
                    sev,
                    mean,
                    style,
                    marker="o",
                    ms=3,
                    color=plots.COLORS[mode],
                    label=f"{mode} {label}",
                )
                if n_runs > 1:
                    ax.fill_between(
                        sev, mean - half, mean + half, color=plots.COLORS[mode], alpha=0.12
                    )
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


def plot_corruption_drops(stats: Mapping[tuple, dict], modes: Sequence[str], path: str) -> None:
    """``corruption_drops.png``: mean DPTQ drop vs severity per corruption, one panel per pair."""
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


def plot_corruption_examples(
    image_hwc: np.ndarray, names: Sequence[str], path: str, seed: int = 0
) -> None:
    """One raw image (float ``[H, W, C]`` in [0, 1]) under corruptions ``names``, severities 0-5."""
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
