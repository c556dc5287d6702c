"""ptq_adversary.audit.certify (branch and bound) and the bounds it rests on
(QuantizedFn.bound_segments, interval bounds; QuantizedFn.bound_margins, the linear relaxation):
the bounds enclose what the quantized program computes for every allocation they claim to
cover, and branch and bound agrees with exhaustive enumeration (certified examples are never
broken, broken ones are broken by the reported bits), under node and time limits, with
candidates, and inside the audit.

The property tests use tiny plain-JAX models (MLPs of 2 and 4 sites on ``[B, 6]``, a residual
conv net of 3 sites on ``[B, 6, 6, 1]``, a 3-site conv net of the remaining primitives) with a
fixed architecture and batch shape per kind, so that the programs (cached by structure) and the
jitted steps are compiled once and reused across examples: compiling dominates the run time.
certify's steps are compiled per budget, hence one certify budget per architecture."""

from __future__ import annotations

import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq_adversary import audit, models, policy, transform

DN = ("NHWC", "HWIO", "NHWC")
FUZZ = settings(max_examples=25, deadline=None, derandomize=True)
CHOICES = (2, 3, 4, 5, 6, 8)
BATCH = 5  # examples per property-test case (a fixed shape: no recompiles)
ROWS = 128  # padded rows of one enumeration call (BATCH x (allocations + 2) fit)
NUM_ALLOCS = 24  # allocations padded to this count for the exhaustive reference


# ---------------------------------------------------------------------------------- models
def mlp(p, x):
    """Dense layers with relu between them: ``len(p) // 2`` layers, one site fewer."""
    n = len(p) // 2
    h = x
    for i in range(n):
        h = h @ p[f"w{i}"] + p[f"b{i}"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def _conv(h, k):
    return jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=DN)


def convnet(p, x):
    """conv (reads x: no site), BatchNorm-like affine, a residual branch conv (site 0: two
    values cross its cut), relu, average pooling, two dense layers (sites 1 and 2; the last
    one's operand is signed)."""
    h = _conv(x, p["k0"]) + p["c0"]
    h = (h - p["bn_mean"]) * jax.lax.rsqrt(p["bn_var"] + 1e-5) * p["bn_scale"] + p["bn_bias"]
    h = jax.nn.relu(h + _conv(jax.nn.relu(h), p["k1"]))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = h.reshape(h.shape[0], -1) @ p["w2"] + p["b2"]
    return h @ p["w3"] + p["b3"]


def mixed(p, x):
    """Every other interval rule: tanh, sigmoid, maximum, leaky relu through a select on a
    comparison, division (by a constant and by an input-dependent positive value), integer
    powers, abs, exp, concatenate and a max-pool; inside the network and, where the
    enclosures are tight (right after the last site), as output heads."""
    h = _conv(x, p["k0"])
    h = jnp.where(h > 0, h, 0.1 * h)  # gt + select_n
    h = _conv(h, p["k1"])  # site 0
    h = nn.max_pool(h, (2, 2), strides=(2, 2))  # reduce_window_max
    h = jnp.concatenate([jnp.tanh(h), jax.nn.sigmoid(h) / 3.0], axis=-1)
    h = h.reshape(h.shape[0], -1) @ p["w2"]  # site 1
    h = jnp.maximum(h, 0.5 * h**2 - 1.0) + jnp.abs(h) ** 3 / (1.0 + h**2)
    h = jnp.concatenate([h, jnp.exp(-jnp.abs(h))], axis=-1)
    z = h @ p["w3"]  # site 2
    a, b, c = z[:, :1], z[:, 1:2], z[:, 2:]
    heads = [jnp.tanh(a), jax.nn.sigmoid(b), jnp.where(c > 0, c, 0.1 * c), a**2, b**3, c / 3.0,
             jnp.maximum(a, -0.5 * a), jnp.abs(b), jnp.exp(jnp.minimum(c, 1.0))]  # fmt: skip
    return jnp.concatenate([z, *heads], axis=-1)


def _normal(rng, shape, scale):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def mlp_params(seed: int, num_sites: int, scale: float = 1.0, width: int = 8, classes: int = 3):
    rng = np.random.default_rng(seed)
    sizes = [6] + [width] * num_sites + [classes]
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layer_scale = scale * rng.choice([0.5, 1.0, 2.0])
        p[f"w{i}"] = _normal(rng, (a, b), layer_scale / np.sqrt(a))
        p[f"b{i}"] = _normal(rng, (b,), 0.1 * layer_scale)
    return p


def conv_params(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {
        "k0": _normal(rng, (3, 3, 1, 4), scale / 3),
        "c0": _normal(rng, (4,), 0.1),
        "bn_mean": _normal(rng, (4,), 0.2),
        "bn_var": rng.uniform(0.5, 2.0, size=(4,)).astype(np.float32),
        "bn_scale": rng.uniform(0.5, 1.5, size=(4,)).astype(np.float32),
        "bn_bias": _normal(rng, (4,), 0.1),
        "k1": _normal(rng, (3, 3, 4, 4), scale / 6),
        "w2": _normal(rng, (36, 8), scale / 6),
        "b2": _normal(rng, (8,), 0.1),
        "w3": _normal(rng, (8, 3), scale / np.sqrt(8)),
        "b3": _normal(rng, (3,), 0.1),
    }


def mixed_params(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {
        "k0": _normal(rng, (3, 3, 1, 3), scale / 3),
        "k1": _normal(rng, (3, 3, 3, 4), scale / 5),
        "w2": _normal(rng, (72, 6), scale / 8),
        "w3": _normal(rng, (12, 3), scale / 3),
    }


ARCHS = {
    "mlp2": (mlp, functools.partial(mlp_params, num_sites=2), (6,)),
    "mlp4": (mlp, functools.partial(mlp_params, num_sites=4), (6,)),
    "conv": (convnet, conv_params, (6, 6, 1)),
    "mixed": (mixed, mixed_params, (6, 6, 1)),
}


def _model(arch: str, seed: int, scale: float = 1.0):
    fn, make, shape = ARCHS[arch]
    params = make(seed, scale=scale)
    model = models.as_quantized_model(fn, params=params, input_shape=shape)
    qfn, state = model.program()
    return model, qfn, state, params


def _inputs(arch: str, seed: int, n: int, kind: str = "normal") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *ARCHS[arch][2])).astype(np.float32)
    if kind == "scaled":
        x = x * np.float32(rng.choice([1e-3, 1e3]))
    elif kind == "sparse":  # exact zeros (and a whole zero example): degenerate ranges
        x = np.where(rng.random(x.shape) < 0.5, 0.0, x).astype(np.float32)
        x[0] = 0.0
    return x


def _batch(arch, qfn, state, seed, n=BATCH, kind="normal", pool=32):
    """``n`` inputs and labels: from a pool of random inputs the ones closest to the decision
    boundary first (breakable by quantization), then random ones; labels are the
    full-precision predictions, except the last example's (wrong in full precision)."""
    x = _inputs(arch, seed, pool, kind)
    logits = np.asarray(qfn(state, jnp.asarray(x)))
    top2 = np.sort(logits, -1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / (1e-30 + np.abs(logits).max(-1))
    order = np.argsort(margin)
    near = n // 2
    rest = np.random.default_rng(seed).permutation(order[near:])[: n - near]
    idx = np.concatenate([order[:near], rest])
    y = logits[idx].argmax(-1).astype(np.int32)
    y[-1] = (y[-1] + 1) % logits.shape[-1]
    return x[idx], y


def _all_bits(budget):
    return np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget), np.int32)


def _feasible(bits, budget) -> bool:
    return bool(np.all(np.isin(bits, budget.choices)) and np.all(bits.sum(-1) == budget.total))


# ------------------------------------------------------------------------ compiled helpers
#: Compile options of the test's own programs (compiling dominates this file's run time; the
#: library's programs, certify's steps included, keep the defaults).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _full(qfn):
    return jax.jit(lambda s, x, b: qfn(s, x, b), compiler_options=FAST)


def _pad(a, size):
    return np.concatenate([a, np.repeat(a[:1], size - len(a), 0)])


def _misclassifies(qfn, state, x, y, bits) -> np.ndarray:
    """bool ``[B]``: whether ``bits [B, L]`` (one allocation per example) misclassifies each
    example, recomputed with a full quantized pass ``qfn(params, x, bits)`` (padded rows)."""
    assert len(x) <= ROWS
    logits = np.asarray(_full(qfn)(state, _pad(np.asarray(x), ROWS), _pad(bits, ROWS)))
    return logits[: len(x)].argmax(-1) != y


def _exhaustive(model, x, y, allocs):
    """audit.exhaustive, the naive per-allocation reference (no prefix sharing), with the
    allocations padded to a fixed count so that every budget reuses one compiled program."""
    n = len(allocs)
    assert n <= NUM_ALLOCS
    loss, correct = audit.exhaustive(model, x, y, _pad(allocs, NUM_ALLOCS), prefix_sharing=False)
    return loss[:n], correct[:n]


@functools.cache
def _cut_program(qfn, start: int, choices: tuple[int, ...] | None):
    """One compiled program per cut: the values live at the cut before segment ``start``
    (``run_segments`` under the allocations ``pick``), the bounds from there (``choices=None``:
    ``bound_segments`` at the lower bounds; else ``bound_margins`` with the linear relaxation
    for ``remaining`` bits), and what ``run_segments`` computes from those same live values
    for the completions ``rows`` of the examples ``idx``."""
    last = qfn.num_sites

    def program(s, x, pick, lower, labels, remaining, idx, rows):
        live = x if start == 0 else qfn.run_segments(s, x, pick, 0, start - 1)
        if choices is None:
            bound = qfn.bound_segments(s, live, lower, start, last)
        else:
            bound = qfn.bound_margins(
                s, live, labels, lower, start, choices=choices, remaining=remaining
            )
        sub = jax.tree.map(lambda a: a[idx], live)
        return bound, qfn.run_segments(s, sub, rows, start, last)

    return jax.jit(program, compiler_options=FAST)


def _at_cut(qfn, state, x, pick, lower, start, tails, keep, *, choices=None, labels=None,
            remaining=None):  # fmt: skip
    """Bounds from the cut before segment ``start`` (the prefix of ``pick`` fixed) and the
    logits of each example's completions ``tails[keep[b]]``: ``(bound, example [R],
    bits [R, L], logits [R, C])``."""
    n = len(x)
    fixed = pick.shape[1] - tails.shape[1]
    idx = np.concatenate([np.full(k.sum(), b) for b, k in enumerate(keep)])
    rows = np.concatenate(
        [np.concatenate([np.repeat(pick[b : b + 1, :fixed], k.sum(), 0), tails[k]], 1)
         for b, k in enumerate(keep)]
    ).astype(np.int32)  # fmt: skip
    assert 0 < len(idx) <= ROWS
    labels = np.zeros(n, np.int32) if labels is None else labels
    remaining = np.zeros(n, np.int32) if remaining is None else remaining
    fn = _cut_program(qfn, start, choices)
    bound, logits = fn(state, x, pick, lower, labels, remaining.astype(np.int32),
                       _pad(idx, ROWS), _pad(rows, ROWS))  # fmt: skip
    return jax.tree.map(np.asarray, bound), idx, rows, np.asarray(logits)[: len(idx)]


def _lower_bounds(pick, choices, rng):
    """Per example and site, a choice at or below ``pick`` (the allocation stays above it)."""
    ch = np.asarray(choices)
    lower = np.empty_like(pick)
    for (b, site), v in np.ndenumerate(pick):
        below = ch[ch <= v]
        lower[b, site] = below[rng.integers(len(below))]
    return lower


def _check_enclosures(qfn, state, x, allocs, choices, rng, first: int = 1) -> int:
    """``bound_segments`` from every cut against enumerated completions.

    Per example, a random feasible allocation ``pick`` fixes the prefix and the lower bounds
    are drawn from the choices at or below ``pick``. From the cut before segment ``start``
    (sites ``0..start-2`` fixed; ``start = 0``: from the input), for every ``start >= first``,
    the logit enclosure for those lower bounds must contain the logits ``run_segments``
    computes from the same live values for every completion at or above the lower bounds:
    the qualifying tails of every enumerated allocation, the lower bounds themselves and
    all-16 bits.

    Returns the number of (example, completion) pairs checked.
    """
    n, num_sites = len(x), qfn.num_sites
    pick = allocs[rng.integers(len(allocs), size=n)]
    lower = _lower_bounds(pick, choices, rng)
    checked = 0
    for start in range(first, num_sites + 1):
        fixed = max(start - 1, 0)
        per_ex = [
            np.concatenate([allocs[:, fixed:], lower[b : b + 1, fixed:],
                            np.full((1, num_sites - fixed), 16)])
            for b in range(n)
        ]  # fmt: skip
        tails = np.concatenate(per_ex)
        owner = np.repeat(np.arange(n), [len(t) for t in per_ex])
        keep = [(owner == b) & np.all(tails >= lower[b, fixed:], axis=1) for b in range(n)]
        (lo, hi), idx, rows, logits = _at_cut(qfn, state, x, pick, lower, start, tails, keep)
        assert lo.shape == hi.shape and lo.shape[0] == n
        assert not np.isnan(lo).any() and not np.isnan(hi).any() and np.all(lo <= hi)
        out = np.any((logits < lo[idx]) | (logits > hi[idx]), axis=1)
        assert not out.any(), (
            f"logits outside the bounds from the cut before segment {start}: example "
            f"{idx[out][:2]}, bits {rows[out][:2].tolist()} (lower "
            f"{lower[idx[out][:2]].tolist()}): {logits[out][:2].tolist()} not in "
            f"[{lo[idx][out][:2].tolist()}, {hi[idx][out][:2].tolist()}]"
        )
        checked += len(idx)
    return checked


def _check_margins(qfn, state, x, y, allocs, budget, rng) -> int:
    """``bound_margins`` (linear relaxation, budget coupled) from every cut ``start >= 1``:
    each lower bound is at most the true margin ``logit[y] - logit[j]`` of every completion
    that meets the budget exactly with every site at or above its lower bound."""
    n, num_sites = len(x), qfn.num_sites
    pick = allocs[rng.integers(len(allocs), size=n)]
    lower = _lower_bounds(pick, budget.choices, rng)
    checked = 0
    for start in range(1, num_sites + 1):
        fixed = start - 1
        remaining = budget.total - pick[:, :fixed].sum(1)
        tails = np.unique(allocs[:, fixed:], axis=0)
        keep = [
            (tails.sum(1) == remaining[b]) & np.all(tails >= lower[b, fixed:], axis=1)
            for b in range(n)
        ]
        assert all(k.any() for k in keep)  # pick's own tail qualifies
        bound, idx, rows, logits = _at_cut(qfn, state, x, pick, lower, start, tails, keep,
                                           choices=budget.choices, labels=y,
                                           remaining=remaining)  # fmt: skip
        assert bound.ndim == 2 and bound.shape[0] == n
        assert np.all(bound[np.arange(n), y] == np.inf) and not np.isnan(bound).any()
        margin = logits[np.arange(len(idx)), y[idx]][:, None] - logits
        other = np.arange(margin.shape[1])[None] != y[idx][:, None]
        bad = (bound[idx] > margin) & other
        assert not bad.any(), (
            f"margin bound above a true margin from the cut before segment {start}: "
            f"example {idx[bad.any(1)][:2]}, bits {rows[bad.any(1)][:2].tolist()}: bound "
            f"{bound[idx][bad.any(1)][:2].tolist()} > margin {margin[bad.any(1)][:2].tolist()}"
        )
        checked += len(idx)
    return checked


def _check_certify(model, qfn, state, x, y, budget, allocs, **kw):
    """certify against the exhaustive enumeration (exact: no limits); returns the result and
    the enumeration's ``correct [N, B]``."""
    r = audit.certify(model, x, y, budget, row_chunk=32, **kw)
    _, correct = _exhaustive(model, x, y, allocs)
    robust = correct.all(0)  # correct under every feasible allocation
    assert r.state.shape == (len(y),) and r.bits.shape == (len(y), budget.num_sites)
    assert r.exact and r.stopped == "" and set(r.states()) <= {"certified", "broken"}
    # no feasible allocation misclassifies a certified example...
    certified = r.state == audit.STATES.index("certified")
    assert np.all(robust[certified]), (r.summary(), correct)
    # ... the broken ones are exactly the breakable ones, by allocations that break them
    np.testing.assert_array_equal(r.broken, ~robust)
    if r.broken.any():
        assert _feasible(r.bits[r.broken], budget)
        assert np.all(_misclassifies(qfn, state, x[r.broken], y[r.broken], r.bits[r.broken]))
    assert r.certified_accuracy == r.accuracy == pytest.approx(robust.mean())
    assert r.bound_calls == int(r.bounded_per_depth.sum())
    assert r.pruned == int(r.pruned_per_depth.sum()) <= r.bound_calls
    return r, correct


# ------------------------------------------------------------------- 1. property: soundness
ARCH_SITES = {"mlp2": 2, "mlp4": 4, "conv": 3}


@st.composite
def models_and_inputs(draw):
    arch = draw(st.sampled_from(sorted(ARCH_SITES)))
    return dict(
        arch=arch,
        seed=draw(st.integers(0, 2**16)),
        scale=draw(st.sampled_from([0.1, 1.0, 3.0, 30.0])),
        kind=draw(st.sampled_from(["normal", "normal", "scaled", "sparse"])),
    )


@st.composite
def budgets(draw, num_sites: int):
    # high-bit choices often enough that the bounds are tight, any subset otherwise
    subsets = st.lists(st.sampled_from(CHOICES), min_size=1, max_size=3, unique=True)
    choices = draw(st.sampled_from([(6, 8), (4, 6, 8)]) | subsets.map(sorted).map(tuple))
    alloc = draw(st.lists(st.sampled_from(choices), min_size=num_sites, max_size=num_sites))
    return policy.Budget(choices, num_sites, sum(alloc) / num_sites)  # integer-feasible


def _case(case):
    model, qfn, state, _ = _model(case["arch"], case["seed"], case["scale"])
    x, y = _batch(case["arch"], qfn, state, case["seed"] + 1, kind=case["kind"])
    return model, qfn, state, x, y


@FUZZ
@given(case=models_and_inputs(), data=st.data())
def test_bound_segments_enclose_every_completion(case, data):
    """(a) From the cut at every depth, under a random prefix, the interval bounds enclose the
    logits of every completion whose bits are at or above the given lower bounds."""
    model, qfn, state, x, _ = _case(case)
    budget = data.draw(budgets(qfn.num_sites))
    allocs = _all_bits(budget)
    rng = np.random.default_rng(case["seed"])
    assert _check_enclosures(qfn, state, x, allocs, budget.choices, rng) >= len(x) * qfn.num_sites


#: certify's steps are compiled per budget: one budget per architecture keeps them reused.
CERTIFY_BUDGETS = {
    "mlp2": policy.Budget((2, 4, 6, 8), 2, 5.0),  # 4 allocations
    "mlp4": policy.Budget((4, 6, 8), 4, 6.0),  # 19
    "conv": policy.Budget((2, 6, 8), 3, 16 / 3),  # 6
}


def test_certify_is_sound_against_enumeration():
    """(b) certify with bounds (the default linear relaxation) on random models and inputs:
    certified examples are never misclassified by a feasible allocation, broken ones are
    broken by their reported bits, and the broken flags equal ``~correct.all(0)`` of the
    enumeration. The linear margin bounds are also checked directly against every
    completion from every cut. Across the run the bounds did certify nodes and both outcomes
    occurred (so the checks are not vacuous)."""
    stats = dict(cases=0, checked=0, pruned=0, certified=0, broken=0)

    @FUZZ
    @given(case=models_and_inputs())
    def check(case):
        model, qfn, state, x, y = _case(case)
        budget = CERTIFY_BUDGETS[case["arch"]]
        allocs = _all_bits(budget)
        rng = np.random.default_rng(case["seed"])
        stats["checked"] += _check_margins(qfn, state, x, y, allocs, budget, rng)
        r, _ = _check_certify(model, qfn, state, x, y, budget, allocs, bounds=True)
        # no candidates: every break must be found in the tree, past the pruned nodes
        none = np.zeros((0, budget.num_sites), np.int32)
        r2, _ = _check_certify(
            model, qfn, state, x, y, budget, allocs, bounds=True, candidates=none
        )
        np.testing.assert_array_equal(r2.state, r.state)
        stats["cases"] += 1
        stats["pruned"] += r.pruned + r2.pruned
        stats["certified"] += int(np.sum(r.state == 0))
        stats["broken"] += int(r.broken.sum())

    check()
    assert stats["pruned"] >= 10 and stats["certified"] >= 10, stats
    assert stats["broken"] >= stats["cases"] + 5, stats  # beyond the FP-wrong example of each
    assert stats["checked"] > 500, stats


# ---------------------------------------------------------------- 2. exactness (fixed model)
@pytest.fixture(scope="module")
def fixed():
    """The conv net with 8 examples (4 near the boundary, the last one wrong in FP) at its
    certify budget; its exhaustive enumeration."""
    model, qfn, state, _ = _model("conv", 0)
    x, y = _batch("conv", qfn, state, 10, n=8)
    budget = CERTIFY_BUDGETS["conv"]
    allocs = _all_bits(budget)
    loss, correct = _exhaustive(model, x, y, allocs)
    # both outcomes occur, so agreement with the enumeration is informative
    assert 0 < correct.all(0).mean() < 1
    return dict(model=model, qfn=qfn, state=state, x=x, y=y, budget=budget, allocs=allocs,
                loss=loss, correct=correct, robust=correct.all(0))  # fmt: skip


@pytest.mark.parametrize("relaxation", ["linear", "interval"])
def test_certify_is_exact_without_limits(fixed, relaxation):
    f = fixed
    args = (f["model"], f["qfn"], f["state"], f["x"], f["y"], f["budget"], f["allocs"])
    runs = {
        b: _check_certify(*args, bounds=b, relaxation=relaxation)[0] for b in ("auto", True, False)
    }
    for r in runs.values():  # (_check_certify: broken flags equal the enumeration's, exact)
        assert r.certified_accuracy == r.accuracy == pytest.approx(f["robust"].mean())
    off, on = runs[False], runs[True]
    assert off.bound_calls == off.pruned == 0 and not off.bounded_per_depth.any()
    assert on.bound_calls > 0 and on.pruned > 0
    # bounds only remove subtrees that hold no breaking leaf: never more nodes, here fewer
    assert np.all(on.nodes <= off.nodes) and on.nodes.sum() < off.nodes.sum()
    # without bounds every leaf of a robust example is evaluated: its worst loss is the
    # enumeration's, reached by the reported bits
    robust = f["robust"]
    np.testing.assert_allclose(off.worst_loss[robust], f["loss"].max(0)[robust], rtol=1e-5)
    for e in np.flatnonzero(robust):
        n = np.flatnonzero(np.all(f["allocs"] == off.bits[e], axis=1))
        assert len(n) == 1 and f["loss"][n[0], e] == pytest.approx(f["loss"][:, e].max(), rel=1e-5)
    # examples searched in several chunks: the same outcome
    chunked = audit.certify(f["model"], f["x"], f["y"], f["budget"], bounds=True,
                            relaxation=relaxation, example_chunk=3, row_chunk=32)  # fmt: skip
    np.testing.assert_array_equal(chunked.state, on.state)
    summary = on.summary()
    json.dumps(summary)
    assert summary["states"] == {
        "certified": int(robust.sum()), "broken": int((~robust).sum()), "unknown": 0
    }  # fmt: skip
    assert summary["state"] == on.states().tolist() and len(summary["state"]) == len(f["y"])
    assert summary["nodes"] == int(on.nodes.sum()) and summary["leaves"] == on.leaves > 0


# ------------------------------------------------------------------------------ 3. limits
def _check_bracket(r, f):
    """Whatever the limits: certified examples are robust, broken ones breakable (by their
    bits), and the accuracy is bracketed."""
    robust = f["robust"]
    certified = r.state == audit.STATES.index("certified")
    unknown = r.state == audit.STATES.index("unknown")
    assert np.all(robust[certified]) and not np.any(robust[r.broken])
    b = r.broken
    if b.any():
        assert np.all(_misclassifies(f["qfn"], f["state"], f["x"][b], f["y"][b], r.bits[b]))
    assert r.certified_accuracy <= robust.mean() <= r.accuracy
    assert r.exact == (not unknown.any())
    assert r.certified_accuracy == pytest.approx(certified.mean())
    assert r.accuracy == pytest.approx(1 - r.broken.mean())


def test_node_limit_leaves_open_examples_unknown(fixed):
    f = fixed
    call = lambda **kw: audit.certify(f["model"], f["x"], f["y"], f["budget"], row_chunk=32, **kw)
    r = call(bounds=False, node_limit=1)
    _check_bracket(r, f)
    assert not r.exact and r.stopped == "node limit"
    assert set(r.states()) <= {"broken", "unknown"}  # no tree: nothing certified
    assert np.all(r.states()[f["robust"]] == "unknown")
    assert r.certified_accuracy == 0.0 < f["robust"].mean() <= r.accuracy
    seen_unknown = seen_exact = False
    for limit in (2, 4, 8, 16, 10**6):
        for bounds in (True, False):
            r = call(bounds=bounds, node_limit=limit)
            _check_bracket(r, f)
            assert r.stopped == ("" if r.exact else "node limit")
            seen_unknown |= not r.exact
            seen_exact |= r.exact
    assert seen_unknown and seen_exact
    r = call(node_limit=10**6)
    assert r.exact and np.array_equal(r.broken, ~f["robust"])


def test_time_limit_zero_decides_nothing(fixed):
    f = fixed
    r = audit.certify(f["model"], f["x"], f["y"], f["budget"], time_limit=0, row_chunk=32)
    assert r.stopped == "time limit" and not r.exact
    assert np.all(r.states() == "unknown")
    assert r.certified_accuracy == 0.0 and r.accuracy == 1.0
    assert r.leaves == 0 and not r.nodes.any()
    assert np.all(r.bits == -1) and np.all(r.worst_loss == -np.inf)
    r = audit.certify(f["model"], f["x"], f["y"], f["budget"], time_limit=1e6, row_chunk=32)
    assert r.exact and r.stopped == "" and np.array_equal(r.broken, ~f["robust"])


# -------------------------------------------------------------------------- 4. candidates
def test_per_example_candidates_break_their_examples(fixed):
    f = fixed
    breakable = ~f["robust"]
    n = len(f["y"])
    uniform = np.asarray(policy.to_bits(policy.uniform_allocation(f["budget"]), f["budget"]))
    # per breakable example a misclassifying allocation (the lowest-loss one), else uniform
    wrong_loss = np.where(f["correct"], np.inf, f["loss"])
    breaking = np.where(breakable[:, None], f["allocs"][wrong_loss.argmin(0)], uniform[None])
    call = lambda c, **kw: audit.certify(
        f["model"], f["x"], f["y"], f["budget"], candidates=c, row_chunk=32, **kw
    )
    # node_limit=1: no tree below the root, so whatever is broken was broken by a candidate
    r = call(breaking[None], bounds=False, node_limit=1)
    np.testing.assert_array_equal(r.broken, breakable)
    np.testing.assert_array_equal(r.bits[breakable], breaking[breakable])
    assert np.all(r.states()[~breakable] == "unknown")
    # one candidate each for the broken; the others also ran the root segment
    np.testing.assert_array_equal(r.nodes, np.where(breakable, 1, 2))
    assert r.leaves == n
    # a harmless candidate first (one that classifies the example correctly, where one
    # exists): the breaking one still breaks, with its own bits
    harmless = f["allocs"][f["correct"].argmax(0)]
    some_right = f["correct"].any(0) & breakable
    assert some_right.any()
    r = call(np.stack([harmless, breaking]), bounds=False, node_limit=1)
    np.testing.assert_array_equal(r.broken, breakable)
    np.testing.assert_array_equal(r.bits[some_right], breaking[some_right])
    # [M, L]: the same allocations for every example; all of them break every breakable one
    r = call(f["allocs"], bounds=False, node_limit=1)
    np.testing.assert_array_equal(r.broken, breakable)
    assert _feasible(r.bits[breakable], f["budget"])
    # without limits the candidates change nothing in the outcome
    r = call(breaking[None])
    assert r.exact and np.array_equal(r.broken, breakable)


@pytest.mark.parametrize("shape", [(2, 9, 3), (2, 8, 4), (2, 8, 3, 1), (3,), (2, 4)], ids=str)
def test_bad_candidate_shapes_are_refused(fixed, shape):
    f = fixed
    with pytest.raises(ValueError):
        audit.certify(f["model"], f["x"], f["y"], f["budget"],
                      candidates=np.full(shape, 6, np.int32))  # fmt: skip


def test_bad_arguments_are_refused(fixed):
    f = fixed
    call = lambda budget=f["budget"], **kw: audit.certify(f["model"], f["x"], f["y"], budget, **kw)
    with pytest.raises(ValueError, match="budget has 2 sites"):
        call(policy.Budget((2, 6, 8), 2, 7.0))
    with pytest.raises(ValueError, match="relaxation"):
        call(relaxation="crown")
    with pytest.raises(ValueError, match="bounds"):
        call(bounds="always")
    qfn, state, x = f["qfn"], f["state"], f["x"]
    with pytest.raises(ValueError, match="segments"):
        qfn.bound_segments(state, x, np.full((8, 3), 8), 2, 1)


# ------------------------------------------------------------- 5. unsupported primitives
def _with(op):
    """An MLP with ``op`` on the activations between its first and second site."""

    def fn(p, x):
        h = jax.nn.relu(x @ p["w0"] + p["b0"])
        h = op(jax.nn.relu(h @ p["w1"] + p["b1"]))  # after site 0: inside certify's bounds
        return h @ p["w2"] + p["b2"]

    return fn


UNSUPPORTED = {
    "sort": _with(lambda h: jnp.sort(h, axis=-1)),
    "cumprod": _with(lambda h: jnp.cumprod(h, axis=-1)),
    "argmax": _with(lambda h: h + jnp.argmax(h, -1, keepdims=True).astype(h.dtype)),
    "gather": _with(lambda h: jnp.take_along_axis(h, (h[:, :1] > 0.5).astype(jnp.int32), -1) + h),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_primitive_without_interval_rule_is_named(name):
    fn = UNSUPPORTED[name]
    params = mlp_params(3, num_sites=2)
    x = _inputs("mlp2", 4, BATCH)
    qfn = transform.quantize(fn, params, x)  # the transform accepts it
    assert qfn.num_sites == 2
    bits = np.full((BATCH, 2), 6, np.int32)
    live = jax.jit(lambda p, x, b: qfn.run_segments(p, x, b, 0, 0))(params, x, bits)
    logits = jax.jit(lambda p, lv, b: qfn.run_segments(p, lv, b, 1, 2))(params, live, bits)
    assert np.all(np.isfinite(logits))  # the quantized program runs it
    # (traced only: the error is raised before anything is compiled)
    with pytest.raises(transform.UnsupportedPrimitiveError, match=rf"\b{name}\b"):
        jax.jit(lambda p, x, b: qfn.bound_segments(p, x, b, 0, 2))(params, x, bits)
    with pytest.raises(transform.UnsupportedPrimitiveError, match=rf"\b{name}\b"):
        jax.jit(lambda p, lv, b: qfn.bound_segments(p, lv, b, 1, 2))(params, live, bits)
    labels = np.zeros(BATCH, np.int32)
    with pytest.raises(transform.UnsupportedPrimitiveError, match=rf"\b{name}\b"):
        jax.jit(lambda p, lv, b: qfn.bound_margins(p, lv, labels, b, 1))(params, live, bits)


def test_certify_without_bounds_serves_unsupported_models():
    """Interval bounds refuse the model with the sort, naming it; without bounds certify is
    still exact. (The linear relaxation runs segment 1, where the sort is, exactly once per
    choice of its site, so it never meets the sort on intervals in this model.)"""
    params = mlp_params(3, num_sites=2)
    model = models.as_quantized_model(UNSUPPORTED["sort"], params=params, input_shape=(6,))
    qfn, state = model.program()
    x, y = _batch("mlp2", qfn, state, 5)
    budget = CERTIFY_BUDGETS["mlp2"]
    with pytest.raises(transform.UnsupportedPrimitiveError, match="sort"):
        audit.certify(model, x, y, budget, bounds=True, relaxation="interval", row_chunk=32)
    _check_certify(model, qfn, state, x, y, budget, _all_bits(budget), bounds=False)


# --------------------------------------------------- 6. the other primitives' interval rules
def test_mixed_model_uses_the_other_rules():
    """The primitives the mixed model is meant to exercise are in its program."""
    text = str(jax.make_jaxpr(mixed)(mixed_params(0), _inputs("mixed", 0, 1)))
    want = ["tanh", "logistic", "max", "select_n", "gt", "div", "integer_pow", "abs", "exp",
            "concatenate", "reduce_window_max", "mul", "min"]  # fmt: skip
    missing = [name for name in want if not re.search(rf"= {name}\b", text)]
    assert not missing, missing


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    budget=budgets(3),
)
def test_other_interval_rules_enclose_every_completion(seed, scale, budget):
    model, qfn, state, _ = _model("mixed", seed, scale)
    x, y = _batch("mixed", qfn, state, seed + 1)
    rng = np.random.default_rng(seed)
    _check_enclosures(qfn, state, x, _all_bits(budget), budget.choices, rng, first=0)
    mb = CERTIFY_BUDGETS["conv"]
    _check_margins(qfn, state, x, y, _all_bits(mb), mb, rng)


def test_bounds_are_tight_at_high_bits():
    """Not only sound: at 16 bits from the last cut the enclosure is narrow (the rules are not
    vacuous), and it widens as the bits drop."""
    for arch in ("conv", "mixed"):
        model, qfn, state, _ = _model(arch, 0)
        x, _ = _batch(arch, qfn, state, 1)
        L = qfn.num_sites
        pick = np.full((BATCH, L), 8, np.int32)
        tails, keep = np.full((1, 1), 16), [np.ones(1, bool)] * BATCH
        widths = []
        for b in (16, 8, 2):
            lower = np.full((BATCH, L), b, np.int32)
            (lo, hi), _, _, logits = _at_cut(qfn, state, x, pick, lower, L, tails, keep)
            widths.append((hi - lo).max())
        assert widths[0] <= 1e-3 * (1 + np.abs(logits).max()), (arch, widths)
        assert widths[0] < widths[1] < widths[2], (arch, widths)


# ------------------------------------------------------------------------------ 7. audit
def test_audit_reports_the_certified_bracket():
    params = conv_params(0)
    model = models.as_quantized_model(convnet, params=params, input_shape=(6, 6, 1))
    qfn, state = model.program()
    x, y = _batch("conv", qfn, state, 10, n=8)
    budget = CERTIFY_BUDGETS["conv"]
    kw = dict(params=params, choices=budget.choices, budget=budget.budget, progress=False)
    r = audit.audit(convnet, x, y, methods=("uniform", "exhaustive", "certify"), **kw)
    summary = r.summary()
    json.dumps(summary)
    c, exact = summary["methods"]["certify"], summary["methods"]["exhaustive"]
    for key in ("certified_accuracy", "accuracy", "exact", "nodes", "bound_calls", "pruned",
                "leaves", "states", "state"):  # fmt: skip
        assert key in c, key
    assert c["exact"] is True and c["stopped"] == ""
    assert c["certified_accuracy"] == c["accuracy"] == exact["accuracy"] < 1
    assert sum(c["states"].values()) == len(y) == len(c["state"])
    assert (
        c["states"]["broken"] == c["state"].count("broken") == round((1 - c["accuracy"]) * len(y))
    )
    assert c["states"]["unknown"] == 0 and c["nodes"] > 0 and c["leaves"] > 0
    assert c["pruned"] <= c["bound_calls"]
    np.testing.assert_array_equal(r.methods["certify"].broken, r.methods["exhaustive"].broken)
    # a node limit opens the bracket, still around the exact accuracy
    r = audit.audit(convnet, x, y, methods=("uniform", "certify"), certify_node_limit=1, **kw)
    c = r.summary()["methods"]["certify"]
    assert c["exact"] is False and c["stopped"] == "node limit"
    assert c["certified_accuracy"] <= exact["accuracy"] <= c["accuracy"]
    assert c["states"]["unknown"] > 0


def test_infeasible_candidates_are_refused(fixed):
    f = fixed
    bad = np.full((1, f["budget"].num_sites), 0, np.int32)  # 0 bits: no choice, wrong sum
    with pytest.raises(ValueError, match="feasible allocations"):
        audit.certify(f["model"], f["x"], f["y"], f["budget"], candidates=bad)


def _relu_mlp(out):
    w0 = jnp.diag(jnp.asarray([0.3, 0.29]))
    w1 = jnp.asarray([[1.0], [-1.0]])
    return lambda p, x: out(jax.nn.relu(x @ p["w0"]) @ p["w1"]), {"w0": w0, "w1": w1}


@pytest.mark.parametrize(
    "out",
    [lambda z: z**-1, lambda z: z**-2, lambda z: jax.nn.relu(z) / z],
    ids=["inv", "inv2", "div"],
)
def test_unbounded_rules_where_zero_is_inside(out):
    # z straddles 0 under coarse quantization: x^-k and x / z must be unbounded, never NaN
    fn, params = _relu_mlp(out)
    x = jnp.ones((1, 2))
    qfn = transform.quantize(fn, params, x, weight_bits=None)
    live = qfn.run_segments(params, x, jnp.zeros((1, qfn.num_sites), jnp.int32), 0, 0)
    last = qfn.num_segments - 1
    lo, hi = qfn.bound_segments(params, live, jnp.full((1, qfn.num_sites), 2, jnp.int32), 1, last)
    assert not np.isnan(np.asarray(lo)).any() and not np.isnan(np.asarray(hi)).any()
    for b in range(2, 17):
        v = np.asarray(qfn(params, x, jnp.full((1, qfn.num_sites), b, jnp.int32)))
        ok = np.isnan(v) | ((np.asarray(lo) <= v) & (v <= np.asarray(hi)))
        assert ok.all(), (b, v, lo, hi)
