"""P-policy evaluation vs its limit: how close many-allocation evaluation gets to P FP passes.

Evaluates ``P`` bit allocations (``[P, B, L]``, per example and site) of the default student
(``cnn``, 28x28x1, 4 sites) on one batch: per allocation the quantized forward pass and the
masked correct/loss sums of ``steps.make_eval_step``. Modes, all jitted with the weights as
arguments (as in the trainers):

* ``vmap``: ``jax.vmap`` over all P (the policies folded into one batch of ``P x B``);
* ``chunk c``: ``steps.map_policies(..., chunk=c)``, a ``lax.map`` over vmapped chunks of c;
* ``auto``: ``steps.map_policies`` with the library's per-backend default chunk;
* ``loop``: a Python loop of P calls of one jitted single-allocation function;

each with the library's default batch branches (``backend.inference_branches``: the batch cut
into independent parts of ~16 examples that XLA:CPU runs concurrently), plus ``auto, 1 branch``
(the same without branches, as before they existed), against the **limit**
``P x (full-precision forward of the same batch, with the same sums)``, where the FP forward is
the faster of one branch and the same branches as the quantized passes.
Compilation is timed separately (ahead of time) and excluded; medians over repeats.

  python experiments/bench_policies.py [--quick]
"""

from __future__ import annotations

import functools
import time
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ptq_adversary import backend, models, policy, steps

NAME = "P-policy evaluation vs its limit"
GOAL = "best mode <= 1.3x the limit P x (FP forward of the batch) for every P (default cnn)"


def _sums(logits, labels):
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return correct, loss


def _loop(one_fn, args, bits_list):
    return [one_fn(*args, b) for b in bits_list]


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def run(quick: bool = False) -> dict[str, Any]:
    """Times every mode for each P; ratio = max over P of (best mode / limit)."""
    batch = 64 if quick else 128
    plan = {1: [], 8: [1, 4], 32: [1, 4]} if quick else {1: [], 8: [4], 64: [4], 256: []}
    model, graphdef, params, rest = bench_lib.make_cnn()
    num_sites = model.num_sites
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (batch, 28, 28, 1))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10)

    branches = backend.inference_branches(batch)

    def fp_eval(params, rest, images, labels, branches=1):
        logits = models.apply_model(graphdef, params, rest, images, branches=branches)[0]
        return _sums(logits, labels)

    def one_eval(params, rest, images, labels, bits_bl, branches=None):
        logits = models.apply_model(graphdef, params, rest, images, bits_bl, branches=branches)
        return _sums(logits[0], labels)

    def many_eval(chunk, branches=None):
        def fn(params, rest, images, labels, bits_pbl):
            per = lambda b: one_eval(params, rest, images, labels, b, branches)
            return steps.map_policies(per, bits_pbl, chunk=chunk)

        return fn

    args = (params, rest, images, labels)
    fp_fns = {"fp": _compile(fp_eval, *args)[0]}
    fp_fns["fp branched"] = _compile(functools.partial(fp_eval, branches=branches), *args)[0]
    reps = 3 if quick else 7
    fp_times = bench_lib.time_interleaved(
        {k: functools.partial(f, *args) for k, f in fp_fns.items()}, rounds=reps * 2, warmup=2
    )
    fp_name = min(fp_times, key=lambda k: fp_times[k]["median_s"])
    fp_fn, fp_s = fp_fns[fp_name], fp_times[fp_name]["median_s"]
    bits1 = bench_lib.random_bits(key, (batch, num_sites))
    one_fn, _ = _compile(one_eval, *args, bits1)
    # The branches change the schedule, not the numbers: logits of both, bit for bit.
    logits = [
        jax.jit(lambda b, k=k: models.apply_model(graphdef, params, rest, images, b, branches=k))(
            bits1
        )[0]
        for k in (1, branches)
    ]
    identical = bool(jnp.array_equal(*logits))

    rows: list[dict[str, Any]] = []
    worst_best = 0.0
    auto_ratios = []
    for num_policies, chunks in plan.items():
        bits = bench_lib.random_bits(jax.random.fold_in(key, num_policies),
                                     (num_policies, batch, num_sites))  # fmt: skip
        auto_chunk = backend.policy_chunk(num_policies, batch)
        modes: dict[str, Any] = {}
        per_call: dict[str, int] = {}  # policies per vmapped call
        compile_s: dict[str, float] = {}
        # One vmap of 256 policies x 128 inputs takes ~2.6x the limit (a run on 2026-11-30):
        # left out at that size to keep the suite short.
        candidates = [("vmap", num_policies)] if num_policies <= 64 else []
        candidates += [(f"chunk {c}", c) for c in chunks if c != auto_chunk]
        candidates += [(f"auto (chunk {auto_chunk})", None)]
        candidates = [(name, chunk, None) for name, chunk in candidates]
        candidates += [(f"auto (chunk {auto_chunk}), 1 branch", None, 1)]
        for name, chunk, n_branches in candidates:
            fn, compile_s[name] = _compile(many_eval(chunk, n_branches), *args, bits)
            modes[name] = functools.partial(fn, *args, bits)
            per_call[name] = min(chunk or auto_chunk, num_policies)
        modes["loop"] = functools.partial(_loop, one_fn, args, list(bits))
        compile_s["loop"], per_call["loop"] = 0.0, 1
        # The limit's FP forward runs in the same rounds, so load drifts hit it alike.
        modes["fp"] = functools.partial(fp_fn, *args)
        # Big configurations take seconds per call (each call averages over a long time):
        # fewer rounds, no extra warm-up.
        cost = num_policies * fp_s
        heavy = cost > 1.0
        timed = bench_lib.time_interleaved(
            modes, rounds=1 if cost > 3.0 else 2 if heavy else reps, warmup=0 if heavy else 1,
            budget_s=40.0 if heavy else 10.0, calls={"fp": 5 if heavy else 2},
        )  # fmt: skip
        limit = num_policies * timed.pop("fp")["median_s"]
        times = {name: t["median_s"] for name, t in timed.items()}
        best = min(times, key=times.get)
        worst_best = max(worst_best, times[best] / limit)
        auto_ratios.append(times[f"auto (chunk {auto_chunk})"] / limit)
        for name, t in times.items():
            rows.append({
                "P": num_policies, "mode": name, "examples/call": batch * per_call[name],
                "ms": 1e3 * t, "x limit": t / limit, "best": name == best,
                "compile s": compile_s[name],
            })  # fmt: skip
        rows.append({"P": num_policies, "mode": "limit (P x FP forward)", "ms": 1e3 * limit,
                     "x limit": 1.0, "examples/call": batch})  # fmt: skip
    notes = [
        f"batch B = {batch}; FP forward of the batch {1e3 * fp_s:.1f} ms "
        f"({1e6 * fp_s / batch:.0f} us/example; one branch "
        f"{1e3 * fp_times['fp']['median_s']:.1f} ms, {branches} branches "
        f"{1e3 * fp_times['fp branched']['median_s']:.1f} ms: the limit uses the faster); "
        f"library defaults POLICY_CHUNK_EXAMPLES = {backend.POLICY_CHUNK_EXAMPLES}, "
        f"INFERENCE_BRANCH_EXAMPLES = {backend.INFERENCE_BRANCH_EXAMPLES} "
        f"({branches} branches at B = {batch})",
        f"logits with {branches} branches bit-identical to one branch: {identical}",
        "best mode / limit below 1 is possible for P > 1: the first conv reads the image "
        "(no site before it), so map_policies computes it once for all P policies",
        f"library default (auto) vs limit, worst over P: {max(auto_ratios):.2f}x",
    ]
    return {
        "name": NAME, "goal": GOAL, "metric": "max over P of best mode / limit",
        "ratio": worst_best, "met": worst_best <= 1.3, "rows": rows, "notes": notes,
        "library_eval_steps": _library_eval_steps(quick),
    }  # fmt: skip


def _library_eval_steps(quick: bool) -> list[dict[str, Any]]:
    """The trainers' evaluation steps at the configs' eval batch: one vmap, one branch (the
    library before its chunking and branching) vs the library default.

    ``make_eval_step`` with the 3 uniform allocations of ``eval.uniform_bits`` and
    ``make_pair_eval_step`` with greedy + uniform + 4 random allocations (stage C), batch 500
    (configs/fmnist_cnn.py ``eval.batch_size``).
    """
    batch = 100 if quick else 500
    model, graphdef, params, rest = bench_lib.make_cnn()
    budget = policy.Budget(choices=(2, 3, 4, 5, 6, 8), num_sites=model.num_sites, budget=4.0)
    pol = policy.PolicyNet(num_sites=model.num_sites, num_choices=6, in_channels=1,
                               widths=(8, 16), rngs=nnx.Rngs(0))  # fmt: skip
    pol_graphdef, pol_params, pol_rest = nnx.split(pol, nnx.Param, ...)
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (batch, 28, 28, 1))
    labels = jax.random.randint(key, (batch,), 0, 10)
    mask = jnp.ones((batch,))
    bits = steps.uniform_bits((8, 6, 4), batch, model.num_sites)
    fns = {}
    variants = (("one vmap, one branch", 1 << 20, 1), ("library default", None, None))
    for label, chunk, branches in variants:
        ev = jax.jit(steps.make_eval_step(graphdef, chunk=chunk, branches=branches))
        fns[f"make_eval_step, 3 allocations, {label}"] = functools.partial(
            ev, params, rest, images, labels, mask, bits
        )
        pev = jax.jit(steps.make_pair_eval_step(graphdef, pol_graphdef, budget, num_random=4,
                                                chunk=chunk, branches=branches))  # fmt: skip
        fns[f"make_pair_eval_step, 6 allocations, {label}"] = functools.partial(
            pev, params, rest, pol_params, pol_rest, images, labels, mask, key
        )
    timed = bench_lib.time_interleaved(fns, rounds=3, warmup=1, budget_s=30.0)
    rows = []
    for name, t in timed.items():
        base = name.replace("library default", "one vmap, one branch")
        ratio = t["median_s"] / timed[base]["median_s"]
        rows.append({f"step (batch {batch})": name, "ms": 1e3 * t["median_s"],
                     "vs one vmap, one branch": ratio})  # fmt: skip
    return rows


if __name__ == "__main__":
    bench_lib.main(run)
