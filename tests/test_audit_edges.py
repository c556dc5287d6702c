"""Rough edges of the audit: the report lists only vulnerable examples, searches never spend
more evaluations than there are feasible allocations, the plots keep every label and curve
visible, and bad input is rejected with a clear message."""

import numpy as np
import pytest
from flax import nnx

from ptq_adversary import audit, models, policy

CHOICES = (2, 3, 4, 5, 6, 8)


def _images(n=8, size=32, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, channels)).astype(np.float32), np.arange(n) % 10


def _cnn(seed=0):
    return models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(seed), widths=(4, 8, 8, 8)
    )


def _result(fp_correct, vulnerable, loss_increase, methods=None, fp_accuracy=None):
    """A hand-built :class:`audit.AuditResult` over two sites (no model run)."""
    fp_correct = np.asarray(fp_correct, bool)
    vulnerable = np.asarray(vulnerable, bool)
    n = len(fp_correct)
    bits = np.tile(np.array([[2, 6]], np.int32), (n, 1))
    if methods is None:
        methods = {"exhaustive": vulnerable}
    methods = {
        name: audit.MethodResult(
            accuracy=float(np.mean(fp_correct & ~np.asarray(broken, bool))),
            broken=np.asarray(broken, bool),
            worst_loss=np.ones(n, np.float32),
            bits=bits,
            evaluations=3,
            seconds=0.0,
        )
        for name, broken in methods.items()
    }
    return audit.AuditResult(
        site_names=("a", "b"),
        choices=(2, 4, 6),
        budget=4.0,
        num_allocations=3,
        fp_accuracy=float(fp_correct.mean()) if fp_accuracy is None else fp_accuracy,
        fp_correct=fp_correct,
        fp_loss=np.ones(n, np.float32),
        fp_margin=np.linspace(-1, 1, n).astype(np.float32),
        labels=np.arange(n) % 10,
        methods=methods,
        random_accuracy=None,
        vulnerable=vulnerable,
        loss_increase=np.asarray(loss_increase, np.float32),
        breaking_bits=bits,
        min_low_bit_sites=np.where(vulnerable, 1, -1),
        worst_static=None,
        skipped={},
    )


def _table_indices(markdown: str) -> list[int]:
    """The example indices in the markdown's "most vulnerable" table."""
    section = markdown.split("most vulnerable", 1)[1].split("Files:", 1)[0]
    return [
        int(line.split("|")[1])
        for line in section.splitlines()
        if line.startswith("|") and line.split("|")[1].strip().isdigit()
    ]


# Examples: vulnerable (0, 3), FP-correct but unbroken (1, 5), wrong already in FP (2, 4); the
# FP-wrong example 2 has the largest loss increase.
FP = [True, True, False, True, False, True]
VUL = [True, False, False, True, False, False]
LOSS = [1.0, 5.0, 9.0, 2.0, 0.1, 0.5]


def test_ranking_orders_vulnerable_then_robust_then_wrong_in_fp():
    r = _result(FP, VUL, LOSS)
    assert r.ranking().tolist() == [3, 0, 1, 5, 2, 4]


def test_markdown_lists_only_vulnerable_examples(tmp_path):
    r = _result(FP, VUL, LOSS)
    audit.write_report(r, str(tmp_path), top=20)
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == [3, 0]
    assert "The 2 most vulnerable examples" in md
    # ...and at most `top` of them, saying how many there are.
    audit.write_report(r, str(tmp_path), top=1)
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == [3] and "of 2 vulnerable" in md


def test_markdown_says_so_when_nothing_is_vulnerable(tmp_path):
    r = _result(FP, [False] * 6, LOSS)
    audit.write_report(r, str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == []
    assert "No vulnerable examples" in md and "| index |" not in md


def test_examples_csv_states_each_examples_status(tmp_path):
    r = _result(FP, VUL, LOSS)
    audit.write_report(r, str(tmp_path))
    rows = [line.split(",") for line in (tmp_path / "examples.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("index", "rank", "status", "fp_correct")}
    status = {int(row[col["index"]]): row[col["status"]] for row in body}
    assert status == {
        0: "vulnerable",
        1: "robust",
        2: "wrong_in_fp",
        3: "vulnerable",
        4: "wrong_in_fp",
        5: "robust",
    }
    assert [int(row[col["rank"]]) for row in body] == [1, 2, 4, 0, 5, 3]


# ------------------------------------------------------------ search budget vs. allocations
def _few_allocations(model):
    """Choices (2, 8) at the budget of half the sites at 2 bits, half at 8 (rounded down):
    C(L, L // 2) feasible allocations, 6 for four sites, far below a search's default cost."""
    L = model.num_sites
    budget = (2 * (L - L // 2) + 8 * (L // 2)) / L
    return budget, policy.Budget((2, 8), L, budget)


def test_searches_never_exceed_the_number_of_feasible_allocations():
    model = _cnn(seed=2)
    x, y = _images(8, seed=3)
    value, budget = _few_allocations(model)
    n_alloc = policy.num_allocations(budget)
    methods = ("uniform", "random", "greedy", "beam", "exhaustive")
    r = audit.audit(model, x, y, choices=(2, 8), budget=value, methods=methods, progress=False)
    summary = r.summary()
    assert summary["num_allocations"] == n_alloc
    exact = r.methods["exhaustive"]
    for name in ("random_search", "greedy", "beam"):
        assert summary["methods"][name]["evaluations_per_example"] == n_alloc, name
        np.testing.assert_array_equal(r.methods[name].broken, exact.broken)
        np.testing.assert_array_equal(r.methods[name].worst_loss, exact.worst_loss)
    for name in ("random", "greedy", "beam"):
        assert "exact enumeration used" in r.notes[name]
        assert f"{n_alloc} feasible allocations" in summary["notes"][name]
    # The expected accuracy under one random draw is exact: the mean over every allocation.
    bits = np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))
    _, correct = audit.exhaustive(model, x, y, bits)
    assert r.random_accuracy == pytest.approx(float(correct.mean()))
    assert "exact enumeration used" in audit._markdown(r, summary, "t", 5)


def test_capped_search_without_exhaustive_and_uncapped_cases():
    model = _cnn(seed=2)
    x, y = _images(8, seed=3)
    value, budget = _few_allocations(model)
    n_alloc = policy.num_allocations(budget)
    kw = dict(choices=(2, 8), budget=value, progress=False)
    # Fewer draws than allocations: random search runs as asked; greedy is capped.
    r = audit.audit(model, x, y, methods=("random", "greedy"), num_random=n_alloc - 1, **kw)
    assert r.methods["random_search"].evaluations == n_alloc - 1 and "random" not in r.notes
    assert r.methods["greedy"].evaluations == n_alloc and "greedy" in r.notes
    assert "exhaustive" not in r.methods
    # Enumeration not allowed (max_allocations): the search runs at its own cost.
    small = dict(max_allocations=n_alloc - 1, num_iters=1, beam_width=1, num_moves=n_alloc)
    r = audit.audit(model, x, y, methods=("greedy",), **small, **kw)
    starts = len(audit.low_bit_starts(budget))
    assert r.methods["greedy"].evaluations == 1 + starts + n_alloc and not r.notes


# ----------------------------------------------------------------------------------- plots
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
    return _result(fp, methods["exhaustive"], np.ones(n), methods=methods)


def _fp_line_x(ax):
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    return line


@pytest.mark.parametrize("fp_accuracy", [None, 0.1], ids=["fp-75", "fp-10"])
def test_accuracy_plot_labels_stay_off_the_fp_line(fp_accuracy):
    import matplotlib.pyplot as plt

    r = _plot_result()
    if fp_accuracy is not None:  # a low FP line that an outside label would cross
        methods = {"uniform": np.zeros(20, bool), "exhaustive": np.arange(20) < 14}
        r = _result(r.fp_correct, r.vulnerable, r.loss_increase, methods, fp_accuracy)
    fig = audit._accuracy_figure(r)
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
    import matplotlib.pyplot as plt

    r = _plot_result()
    fig = audit._margin_figure(r)
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


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, y: (x[:0], y[:0]), "at least one example"),
        (
            lambda x, y: (x, y.astype(np.float32)),
            "labels must be integer class indices, got float32",
        ),
        (lambda x, y: (x, y + 0.5), "labels must be integer class indices, got float64"),
        (lambda x, y: (np.repeat(x, 3, -1), y), r"model rejected images of shape \(4, 32, 32, 3\)"),
    ],
    ids=["empty", "float32-labels", "fractional-labels", "channels"],
)
def test_audit_rejects_bad_input(change, match):
    x, y = change(*_images(4))
    with pytest.raises(ValueError, match=match) as err:
        audit.audit(_cnn(), x, y, choices=CHOICES, budget=4.0, methods=("uniform",))
    if "model rejected" in match:
        cause = err.value.__cause__  # the model's own error, kept as the cause and quoted
        assert cause is not None and str(cause).splitlines()[0] in str(err.value)


def test_searches_reject_float_labels_and_empty_batches():
    x, y = _images(4)
    budget = policy.Budget(CHOICES, 4, 4.0)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        audit.random_search(_cnn(), x, y.astype(np.float32), budget, num_samples=2)
    with pytest.raises(ValueError, match="at least one example"):
        audit.beam_search(_cnn(), x[:0], y[:0], budget)
