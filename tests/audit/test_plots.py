"""ptq_adversary.audit.plots: the accuracy plot keeps every value label off the FP line, the
margin plot keeps identical curves visible."""

import numpy as np
import pytest

from ptq_adversary import plotting
from ptq_adversary.audit import plots
from tests.audit import cases


def _plot_result():
    n = 20
    fp = np.arange(n) < 15
    same = np.arange(n) < 8
    methods = {
        "uniform": np.zeros(n, bool),  # accuracy = FP accuracy: its label sat on the FP line
        "greedy": same,
        "beam": same.copy(),  # identical to greedy: its curve hid greedy's
        "exhaustive": np.arange(n) < 10,
    }
    return cases.hand_built_result(fp, methods["exhaustive"], np.ones(n), methods=methods)


def _fp_line_x(ax):
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    return line


@pytest.mark.parametrize("fp_accuracy", [None, 0.1], ids=["fp-75", "fp-10"])
def test_accuracy_plot_labels_stay_off_the_fp_line(fp_accuracy):
    plt = plotting.pyplot()
    r = _plot_result()
    if fp_accuracy is not None:  # a low FP line that an outside label would cross
        methods = {"uniform": np.zeros(20, bool), "exhaustive": np.arange(20) < 14}
        r = cases.hand_built_result(
            r.fp_correct, r.vulnerable, r.loss_increase, methods, fp_accuracy
        )
    fig = plots.accuracy_figure(r)
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        line = _fp_line_x(ax)
        x_px = ax.transData.transform((line.get_xdata()[0], 0))[0]
        assert line.get_xdata()[0] == pytest.approx(100 * r.fp_accuracy)
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == len(r.methods)
        for t in labels:
            box = t.get_window_extent(renderer)
            assert not box.x0 - 2 <= x_px <= box.x1 + 2, t.get_text()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(f"{100 * r.fp_accuracy:.1f}%" in s for s in legend), legend
    finally:
        plt.close(fig)


def test_margin_plot_keeps_identical_curves_visible():
    plt = plotting.pyplot()
    r = _plot_result()
    fig = plots.margin_figure(r)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == len(r.methods)
        styles = {(ln.get_linestyle(), ln.get_marker()) for ln in lines}
        assert len(styles) == len(lines)  # every curve its own line style and marker
        xs = {tuple(np.round(ln.get_xdata(), 6)) for ln in lines}
        assert len(xs) == len(lines)  # offset: identical curves do not sit on each other
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("beam" in s and "identical to greedy" in s for s in legend), legend
        assert sum("identical" in s for s in legend) == 1, legend
    finally:
        plt.close(fig)
