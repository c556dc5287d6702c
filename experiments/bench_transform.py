"""Transformed zoo vs hand-written layers: the same models, weights and inputs, side by side.

Until commit 1dbe6eb the models were built from a layer library that threaded the bit-widths
through every call (``model(x, bits, train=..., frozen_bn=...)``); now they are plain
``flax.nnx`` networks (:mod:`ptq_adversary.models.zoo`) whose quantized program is derived by
:mod:`ptq_adversary.transform` (``models.apply_model``). This bench times both in one process:
the legacy code is materialized from git and its weights ported into the new networks with the
helpers of ``experiments/legacy_equivalence.py`` (randomized weights, BatchNorm statistics
calibrated on a separate batch), so both sides compute the same function on the same inputs
(their max output difference is in the table).

Models: the default student ``cnn`` (28x28x1, batch 128) and ``resnet20`` (32x32x3, batch 64),
10 classes, 8-bit weights, N(0, 1) images. Cases, each jitted with the weights, images and bits
as arguments, through each side's own ``apply_model`` (same default batch branches on both:
``inference_branches(B)``, i.e. 8 for quantized inference at B = 128, else 1):

* (a) FP forward: ``apply_model(g, p, r, x)``;
* (b) quantized forward, one allocation ``bits [B, L]`` (per example and site, uniform over
  {2, 3, 4, 5, 6, 8});
* (c) P = 8 policies: ``jax.vmap`` of (b) over ``bits [P, B, L]``;
* (d) the stage-B-like QAT gradient: ``jax.value_and_grad`` of the mean cross-entropy of the
  quantized pass with ``train=True, frozen_bn=True`` w.r.t. the parameters.

Compile s: ``jax.jit(fn).lower(*args).compile()`` (trace, lower, XLA compile) after
``jax.clear_caches()`` and with the transform's program cache cleared, so the new side's time
includes finding the sites in the traced program. Steady state: median of ``reps`` calls per side
(15 in the full run) timed round-robin old, new, old, new, ... (``bench_lib.time_interleaved``)
so that load drift hits both alike; ratio = new / old.

  python experiments/bench_transform.py [--quick] [--out FILE.md]

The full run writes ``experiments/results/benchmarks/transform.{md,json}`` unless ``--out``
says otherwise (``--quick`` writes only with ``--out``).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import legacy_equivalence as legacy_eq
import numpy as np
import optax
from flax import nnx

from ptq_adversary import backend, models

NAME = "transformed zoo vs hand-written layers"
GOAL = "new (zoo + transform) / old (1dbe6eb layers) steady-state time <= 1.1 in every case"
COMMAND = "python experiments/bench_transform.py"
OUT = bench_lib.REPO / "experiments" / "results" / "benchmarks" / "transform.md"
NUM_POLICIES = 8
NUM_CLASSES = 10

#: (name, in_channels, image size, batch full, batch quick).
MODELS = [("cnn", 1, 28, 128, 32), ("resnet20", 3, 32, 64, 16)]


def _ce(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _case_fns(apply, graphdef) -> dict[str, Any]:
    """The four cases for one side; ``apply`` is that side's ``apply_model``."""

    def fp(p, r, x):
        return apply(graphdef, p, r, x)[0]

    def q(p, r, x, b):
        return apply(graphdef, p, r, x, b)[0]

    def policies(p, r, x, b_pbl):
        return jax.vmap(lambda b: apply(graphdef, p, r, x, b)[0])(b_pbl)

    def grad(p, r, x, b, y):
        loss = lambda p: _ce(apply(graphdef, p, r, x, b, train=True, frozen_bn=True)[0], y)
        return jax.value_and_grad(loss)(p)

    return {
        "(a) FP forward": (fp, ("x",)),
        "(b) quantized forward": (q, ("x", "bits")),
        f"(c) {NUM_POLICIES} policies, vmap": (policies, ("x", "bits_p")),
        "(d) QAT grad (train, frozen BN)": (grad, ("x", "bits", "labels")),
    }


def _compile(fn, args) -> tuple[Any, float]:
    jax.clear_caches()
    models.clear_quantize_cache()  # the transform's cache: its analysis is counted
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _difference(case: str, old_out, new_out) -> float:
    """Max |old - new| of the logits; for the gradient, of the loss and the gradient norm."""
    if case.startswith("(d)"):
        (lo, go), (ln, gn) = old_out, new_out
        return max(abs(float(lo) - float(ln)), abs(float(optax.global_norm(go))
                                                   - float(optax.global_norm(gn))))  # fmt: skip
    return float(np.max(np.abs(np.asarray(old_out, np.float64) - np.asarray(new_out, np.float64))))


def _model_rows(legacy, name, c, hw, batch, reps) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    old = legacy.create_model(
        name, num_classes=NUM_CLASSES, in_channels=c, weight_bits=8, rngs=nnx.Rngs(0)
    )
    legacy_eq.randomize(old, seed=7)
    legacy_eq.calibrate(old, jnp.asarray(rng.standard_normal((batch, hw, hw, c)), jnp.float32))
    new = models.create_model(name, num_classes=NUM_CLASSES, in_channels=c, image_size=hw,
                              weight_bits=8, rngs=nnx.Rngs(2))  # fmt: skip
    legacy_eq.port_legacy_state(old, new.net)
    if old.num_sites != new.num_sites:
        raise AssertionError(f"{name}: {old.num_sites} vs {new.num_sites} sites")
    num_sites = new.num_sites
    key = jax.random.PRNGKey(1)
    inputs = {
        "x": jnp.asarray(rng.standard_normal((batch, hw, hw, c)), jnp.float32),
        "bits": bench_lib.random_bits(key, (batch, num_sites)),
        "bits_p": bench_lib.random_bits(
            jax.random.fold_in(key, 1), (NUM_POLICIES, batch, num_sites)
        ),
        "labels": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    }
    sides = {
        "old": (legacy.apply_model, *legacy.split_model(old)),
        "new": (models.apply_model, *models.split_model(new)),
    }
    fns = {side: _case_fns(apply, g) for side, (apply, g, _, _) in sides.items()}
    rows = []
    for case in fns["old"]:
        compiled, compile_s, call = {}, {}, {}
        for side, (_, _, p, r) in sides.items():
            fn, names = fns[side][case]
            args = (p, r, *(inputs[n] for n in names))
            compiled[side], compile_s[side] = _compile(fn, args)
            call[side] = functools.partial(compiled[side], *args)
        diff = _difference(case, call["old"](), call["new"]())
        timed = bench_lib.time_interleaved(call, rounds=reps, warmup=1)
        old_s, new_s = timed["old"]["median_s"], timed["new"]["median_s"]
        per_call = batch * (NUM_POLICIES if "policies" in case else 1)
        rows.append({
            "model": name, "case": case, "examples/call": per_call,
            "old compile s": compile_s["old"], "new compile s": compile_s["new"],
            "compile new / old": compile_s["new"] / compile_s["old"],
            "old ms": 1e3 * old_s, "new ms": 1e3 * new_s, "new / old": new_s / old_s,
            "reps": timed["new"]["repeats"], "max abs old - new": diff,
        })  # fmt: skip
        print(f"{name} {case}: old {1e3 * old_s:.2f} ms, new {1e3 * new_s:.2f} ms "
              f"({new_s / old_s:.3f}x); compile {compile_s['old']:.1f} / "
              f"{compile_s['new']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    """Every model and case; ratio = worst new / old steady-state time."""
    result: dict[str, Any] = {"name": NAME, "goal": GOAL,
                              "metric": "max over cases of new / old median time"}  # fmt: skip
    reps = 5 if quick else 15
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="legacy_ptq_") as tmp:
        try:
            legacy, commit = legacy_eq.load_legacy(pathlib.Path(tmp))
        except (subprocess.CalledProcessError, FileNotFoundError) as e:  # no git / no history
            return {**result, "ratio": None, "met": None, "rows": [{"status": "skipped"}],
                    "notes": [f"legacy code of {legacy_eq.LEGACY_COMMIT} not readable from git: "
                              f"{type(e).__name__}: {e}"]}  # fmt: skip
        for name, c, hw, batch_full, batch_quick in MODELS:
            batch = batch_quick if quick else batch_full
            rows += _model_rows(legacy, name, c, hw, batch, reps)
    ratio = max(r["new / old"] for r in rows)
    batches = sorted({r["examples/call"] for r in rows if "policies" not in r["case"]})
    branches = {b: backend.inference_branches(b) for b in batches}
    notes = [
        f"command: `{COMMAND}{' --quick' if quick else ''}`",
        f"old: ptq_adversary/{{layers,models,quant}}.py of {commit[:12]} (materialized from "
        "git, experiments/legacy_equivalence.py); new: the working tree's zoo + transform; "
        "weights ported old -> new, N(0, 1) images, 10 classes, weight_bits 8",
        f"batch branches of quantized inference (both sides' default), by batch: {branches}; "
        "FP and gradient passes: 1",
        f"steady state: median of {reps} interleaved calls per side; compile: one "
        "trace + lower + XLA compile per side after jax.clear_caches()",
        "max abs old - new: logits for (a)-(c); for (d) max of |loss diff| and |grad-norm diff|",
    ]
    return {**result, "ratio": ratio, "met": ratio <= 1.1, "rows": rows, "notes": notes}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a sanity pass")
    parser.add_argument(
        "--out", default=None, type=pathlib.Path,
        help="markdown file (and .json next to it); full run default "
        "experiments/results/benchmarks/transform.md",
    )  # fmt: skip
    args = parser.parse_args()
    out = args.out or (None if args.quick else OUT)
    t0 = time.perf_counter()
    result = bench_lib.call_run(run, quick=args.quick, plot_dir=None)
    wall = time.perf_counter() - t0
    command = " ".join(["python", "experiments/bench_transform.py",
                        *map(shlex.quote, sys.argv[1:])])  # fmt: skip
    text = "\n".join([
        f"# {NAME}", "",
        f"- command: `{command}`",
        f"- hardware: {bench_lib.hardware_line(result['hardware'])}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; wall {wall:.0f} s; "
        f"other load {result['other_load_cores'] or 0:.2f} cores",
        f"- goal: {GOAL}; {result['metric']}: {bench_lib.format_cell(result['ratio'])}, "
        f"met: {bench_lib.format_cell(result['met'])}",
        "", bench_lib.markdown_table(result["rows"]), "",
        *(f"- {n}" for n in result.get("notes", [])), "",
    ])  # fmt: skip
    print(text)
    if out is not None:
        os.makedirs(out.parent, exist_ok=True)
        out.write_text(text)
        with open(out.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump({**result, "wall_s": wall, "command": command}, f, indent=1, default=float)
        print(f"wrote {out} and {out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
