"""ptq_adversary.audit.audit end to end: searches are feasible and bounded by the exact worst
case, any linen / NNX / plain-JAX model can be audited, searches never spend more evaluations
than there are feasible allocations, and bad input is rejected with a clear message."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import audit, policy, transform
from ptq_adversary.audit import report
from tests.audit import cases
from tests.audit.cases import CHOICES


@pytest.fixture(scope="module")
def tiny_audit():
    model = cases.cnn(seed=3)
    x, y = cases.images(16, seed=1)
    result = audit.audit(
        model, x, y, choices=CHOICES, budget=4.0, num_iters=2, beam_width=2, num_moves=3,
        policy_config=audit.PolicyConfig(steps=2, batch_size=8, num_samples=2, widths=(4,)),
        example_chunk=8, progress=False,
    )  # fmt: skip
    return model, x, y, result


def test_audit_searches_are_bounded_by_the_exact_worst_case(tiny_audit):
    model, x, y, r = tiny_audit
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    exact = r.methods["exhaustive"]
    assert exact.evaluations == r.num_allocations == policy.num_allocations(budget)
    for name in ("random_search", "greedy", "beam", "uniform", "policy"):
        m = r.methods[name]
        assert np.all(m.worst_loss <= exact.worst_loss + 1e-5), name
        assert not np.any(m.broken & ~exact.broken), name  # nothing the oracle misses
        assert m.accuracy >= exact.accuracy, name
        assert cases.feasible(m.bits, budget), name
    # uniform + 4 low-bit starts + iterations x width x moves
    assert r.methods["greedy"].evaluations == r.methods["beam"].evaluations == 1 + 4 + 2 * 2 * 3
    assert r.methods["random_search"].evaluations == 17  # equal cost by default
    # The reported breaking allocation really breaks each vulnerable example.
    loss, correct = audit.evaluate_allocations(model, x, y, r.breaking_bits)
    np.testing.assert_array_equal(~correct & r.fp_correct, r.vulnerable)
    # Fewest low-bit sites: consistent with the breaking allocations of the oracle.
    vul = r.vulnerable
    assert np.all((r.min_low_bit_sites >= 0) == vul)
    assert np.all(r.min_low_bit_sites[vul] <= (r.breaking_bits[vul] < 4).sum(-1))


def test_audit_ranking_puts_vulnerable_first(tiny_audit):
    *_, r = tiny_audit
    rank = r.ranking()
    k = int(r.vulnerable.sum())
    assert np.all(r.vulnerable[rank[:k]]) and not np.any(r.vulnerable[rank[k:]])
    assert np.all(np.diff(r.loss_increase[rank[:k]]) <= 0)


def test_audit_report_files(tiny_audit, tmp_path):
    *_, r = tiny_audit
    paths = audit.write_report(r, str(tmp_path), title="tiny")
    for p in paths.values():
        assert os.path.getsize(p) > 0, p
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert set(summary["methods"]) == set(r.methods)
    rows = (tmp_path / "examples.csv").read_text().splitlines()
    assert len(rows) == 1 + r.num_examples and rows[0].endswith("bits_head")
    assert "exhaustive (oracle)" in (tmp_path / "summary.md").read_text()


def test_audit_plain_nnx_model():
    x, y = cases.images(8)
    methods = ("uniform", "greedy", "exhaustive")
    r = audit.audit(cases.user_net(2), x, y, choices=(2, 4, 6, 8), budget=5.0, methods=methods,
                    num_iters=1, num_moves=40, progress=False)  # fmt: skip
    assert r.site_names == ("conv2", "head")
    assert r.num_allocations == 4  # (2, 8), (4, 6), (6, 4), (8, 2)
    assert set(r.methods) == {"uniform", "greedy", "exhaustive"}
    assert np.all(r.methods["greedy"].worst_loss <= r.methods["exhaustive"].worst_loss + 1e-5)


def test_audit_linen_model_end_to_end():
    x, y = cases.images(8, 16)
    module, variables = cases.linen_resnet(x)
    r = audit.audit(module.apply, x, y, params=variables, choices=(2, 4, 8), budget=4.0,
                    methods=("uniform", "random", "exhaustive"), num_random=3,
                    progress=False)  # fmt: skip
    assert r.site_names[0] == "Conv_0" and r.site_names[-1] == "head"
    assert "proj1" in r.site_names
    assert np.all(
        r.methods["random_search"].worst_loss <= r.methods["exhaustive"].worst_loss + 1e-5
    )


def test_audit_rejects_models_the_transform_cannot_serve():
    x, y = cases.images(4, 16)
    module, variables = cases.linen_resnet(x)
    kw = dict(choices=(2, 4, 8), budget=4.0, methods=("uniform",), progress=False)
    with pytest.raises(TypeError, match="params="):
        audit.audit(module.apply, x, y, **kw)  # a linen module without its variables
    train_mode = lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0]
    with pytest.raises(transform.TransformError, match="mixes examples"):
        audit.audit(train_mode, x, y, params=variables, **kw)
    w = jnp.ones((16 * 16, 10)) * 0.01
    one_layer = lambda p, x: x.reshape(x.shape[0], -1) @ p
    with pytest.raises(transform.TransformError, match="no quantization site"):
        audit.audit(one_layer, x, y, params=w, **kw)

    def ignores_bits(p, x):  # a site whose output is multiplied away: bits have no effect
        h = x.reshape(x.shape[0], -1) @ p
        return (h @ jnp.ones((10, 10))) * 0.0 + h

    with pytest.raises(transform.TransformError, match="does not depend on the bits"):
        audit.audit(ignores_bits, x, y, params=w, **kw)

    def scanned(p, x):
        h = x.reshape(x.shape[0], -1) @ p
        h, _ = jax.lax.scan(lambda h, _: (h @ jnp.eye(10), None), h, None, length=2)
        return h

    with pytest.raises(transform.TransformError, match="lax.scan"):
        audit.audit(scanned, x, y, params=w, **kw)


def test_exhaustive_is_skipped_above_the_limit():
    model = cases.cnn()
    x, y = cases.images(4)
    r = audit.audit(model, x, y, choices=CHOICES, budget=4.0, methods=("uniform", "exhaustive"),
                    max_allocations=10, progress=False)  # fmt: skip
    assert "exhaustive" not in r.methods and "109" in r.skipped["exhaustive"]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, y: (x * np.nan, y), "NaN or inf"),
        (lambda x, y: (x[..., 0], y), r"images must be \[B, H, W, C\]"),
        (lambda x, y: (x, y[:-1]), r"labels must be \[B\]"),
        (lambda x, y: ((x * 255).astype(np.uint8), y), "images must be float"),
        (lambda x, y: (x, y + 10), r"labels must be in \[0, 10\)"),
    ],
    ids=["nan", "rank", "labels-shape", "uint8", "label-range"],
)
def test_audit_rejects_bad_data(change, match):
    x, y = change(*cases.images(4))
    with pytest.raises(ValueError, match=match):
        audit.audit(cases.cnn(), x, y, choices=CHOICES, budget=4.0, methods=("uniform",))


def test_audit_rejects_bad_settings():
    x, y = cases.images(4)
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        audit.audit(cases.cnn(), x, y, choices=CHOICES, budget=4.0, methods=("oracle",))
    with pytest.raises(policy.InfeasibleBudgetError):
        audit.audit(cases.cnn(), x, y, choices=CHOICES, budget=1.0, methods=("uniform",))


# ------------------------------------------------------------ search budget vs. allocations
def _few_allocations(model):
    """Choices (2, 8) at the budget of half the sites at 2 bits, half at 8 (rounded down):
    C(L, L // 2) feasible allocations, 6 for four sites, far below a search's default cost."""
    L = model.num_sites
    budget = (2 * (L - L // 2) + 8 * (L // 2)) / L
    return budget, policy.Budget((2, 8), L, budget)


def test_searches_never_exceed_the_number_of_feasible_allocations():
    model = cases.cnn(seed=2, image_size=32)
    x, y = cases.images(8, 32, seed=3)
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
    assert "exact enumeration used" in report.summary_markdown(r, summary, "t", 5)


def test_capped_search_without_exhaustive_and_uncapped_cases():
    model = cases.cnn(seed=2, image_size=32)
    x, y = cases.images(8, 32, seed=3)
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
    x, y = change(*cases.images(4, 32))
    with pytest.raises(ValueError, match=match) as err:
        audit.audit(
            cases.cnn(image_size=32), x, y, choices=CHOICES, budget=4.0, methods=("uniform",)
        )
    if "model rejected" in match:
        cause = err.value.__cause__  # the model's own error, kept as the cause and quoted
        assert cause is not None and str(cause).splitlines()[0] in str(err.value)
