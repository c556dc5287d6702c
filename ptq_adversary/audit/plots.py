"""The audit's figures (matplotlib through :func:`ptq_adversary.plotting.pyplot`, headless).

* :func:`accuracy_figure`: accuracy per method against the FP accuracy (value labels placed
  clear of the FP line by :func:`bar_label_x`);
* :func:`margin_figure`: flip rate per FP-margin decile, one curve per method;
* :func:`bits_figure`: the bits per site of the allocations that break the vulnerable
  examples;
* :func:`save_plots`: all three as the report's PNG files.
"""

from __future__ import annotations

import numpy as np

from ptq_adversary import plotting
from ptq_adversary.audit.results import METHOD_LABELS, AuditResult, status_codes

__all__ = ["accuracy_figure", "bar_label_x", "bits_figure", "margin_figure", "save_plots"]


def bar_label_x(value: float, line: float, width: float, gap: float = 1.0):
    """Where a horizontal bar's value label goes so that it stays clear of a vertical line.

    Args:
      value: the bar's length; line: the line's position; width: the label's width (all in
        data units); gap: the space kept to the bar's end and to the line.

    Returns:
      ``(x, inside)``: the label's left edge, and whether it lies on the bar (white text).
      Preferred: on the bar against its end; else on the bar left of the line (where the
      line crosses the bar); else after the bar's end, or after the line if it is in the way.
    """
    clear = lambda x0: not x0 - gap < line < x0 + width + gap
    if value - gap - width >= gap and clear(value - gap - width):
        return value - gap - width, True
    if line < value and line - gap - width >= gap:
        return line - gap - width, True
    if clear(value + gap):
        return value + gap, False
    return max(value, line) + gap, False


def accuracy_figure(result: AuditResult):
    """Accuracy per method as bars against the FP accuracy (a dashed line behind the bars,
    its value in the legend); each bar's value label is placed clear of the line."""
    plt = plotting.pyplot()
    names = list(result.methods)
    acc = [100 * result.methods[n].accuracy for n in names]
    fp = 100 * result.fp_accuracy
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.axvline(fp, color="k", ls="--", lw=1, zorder=1, label=f"full precision: {fp:.1f}%")
    labels = [METHOD_LABELS.get(n, n) for n in names]
    ax.barh(labels, acc, color="tab:red", zorder=2)
    proved = [100 * result.methods[n].extra.get("certified_accuracy", np.nan) for n in names]
    if np.isfinite(proved).any():  # certify: the proved part of its bar, hatched
        ax.barh(labels, np.nan_to_num(proved), color="darkred", hatch="//", edgecolor="white",
                zorder=2.5, label="certified (proved)")  # fmt: skip
    ax.set_xlabel("test accuracy under DPTQ (%)")
    ax.set_xlim(0, 105)
    ax.invert_yaxis()
    ax.set_title(f"Accuracy by allocation method (budget {result.budget:g} bits)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # fixes the axes' size, so label widths convert to data units
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    for y, a in enumerate(acc):
        text = ax.text(0, y, f"{a:.1f}", fontsize=8, fontweight="bold", va="center", zorder=3)
        px = text.get_window_extent(renderer).width  # bold: the wider of the two weights
        width = to_data.transform((px, 0))[0] - to_data.transform((0, 0))[0]
        x, inside = bar_label_x(a, fp, width)
        text.set_x(x)
        if not inside:  # after the bar: plain black text
            text.set_color("black")
            text.set_fontweight("normal")
        else:
            text.set_color("white")
    return fig


_CURVE_STYLES = ("-", "--", "-.", ":")
_CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def margin_figure(result: AuditResult):
    """Flip rate per FP-margin decile, one curve per method.

    Every curve has its own line style and marker, is shifted a little sideways, and later
    curves are drawn with smaller markers on top, so overlapping curves all stay visible; a
    curve equal to an earlier one says so in the legend.
    """
    plt = plotting.pyplot()
    names = list(result.methods)
    right = result.fp_correct.astype(bool)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    if right.sum() >= 10:
        margins = result.fp_margin[right]
        edges = np.quantile(margins, np.linspace(0, 1, 11))
        decile = np.clip(np.searchsorted(edges, margins, side="right") - 1, 0, 9)
        drawn: dict[str, np.ndarray] = {}
        for k, name in enumerate(names):
            broken = result.methods[name].broken[right]
            rate = np.array(
                [
                    100 * broken[decile == d].mean() if (decile == d).any() else np.nan
                    for d in range(10)
                ]
            )
            label = METHOD_LABELS.get(name, name)
            same = [n for n, r in drawn.items() if np.array_equal(r, rate, equal_nan=True)]
            if same:
                label += f" (identical to {METHOD_LABELS.get(same[0], same[0])})"
            drawn[name] = rate
            offset = 0.07 * (k - (len(names) - 1) / 2)
            ax.plot(
                np.arange(1, 11) + offset,
                rate,
                ls=_CURVE_STYLES[k % len(_CURVE_STYLES)],
                marker=_CURVE_MARKERS[k % len(_CURVE_MARKERS)],
                ms=max(3.0, 7.5 - 0.8 * k),
                lw=1.3,
                alpha=0.9,
                zorder=2 + k,
                label=label,
            )
    ax.set_xlabel("FP margin decile (1 = smallest logit margin; curves shifted sideways)")
    ax.set_ylabel("FP-correct examples flipped (%)")
    ax.set_xticks(np.arange(1, 11))
    ax.set_ylim(-3, 103)
    ax.set_title("Who breaks: flip rate vs full-precision margin")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def bits_figure(result: AuditResult):
    """For each site (x) and bit choice (bars), the share of the vulnerable examples whose
    breaking allocation (:attr:`~ptq_adversary.audit.AuditResult.breaking_bits`) gives the
    site that choice."""
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    vul = status_codes(result) == 0
    width = 0.8 / len(result.choices)
    for k, c in enumerate(result.choices):
        frac = [
            100 * np.mean(result.breaking_bits[vul, s] == c) if vul.any() else 0.0
            for s in range(len(result.site_names))
        ]
        ax.bar(
            np.arange(len(result.site_names)) + (k - len(result.choices) / 2 + 0.5) * width,
            frac,
            width,
            label=f"{c} bits",
        )
    ax.set_xticks(np.arange(len(result.site_names)), result.site_names)
    ax.set_xlabel("quantization site (forward order)")
    ax.set_ylabel("breaking allocations (%)")
    ax.set_title(
        f"Bits per site in the allocations that break the {int(vul.sum())} vulnerable examples",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_plots(result: AuditResult, paths: dict[str, str]) -> None:
    """Writes :func:`accuracy_figure`, :func:`margin_figure` and :func:`bits_figure` to
    ``paths["accuracy_png"]``, ``paths["margin_png"]`` and ``paths["bits_png"]`` (130 dpi)."""
    plt = plotting.pyplot()
    for kind, figure in (
        ("accuracy_png", accuracy_figure),
        ("margin_png", margin_figure),
        ("bits_png", bits_figure),
    ):
        fig = figure(result)
        fig.savefig(paths[kind], dpi=130)
        plt.close(fig)
