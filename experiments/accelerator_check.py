"""The benchmark and report parts of ``experiments/accelerator_check.sh`` (see that file).

  python experiments/accelerator_check.py bench  --out DIR [--dry-run] [--budget-s S]
  python experiments/accelerator_check.py report --out DIR [--dry-run]

``bench`` measures, on whatever backend JAX picks (the GPU on an accelerator machine), on two
models: the default student (``cnn``, 28x28x1, 4 sites) and a ResNet-18 at CIFAR-10 shape
(32x32x3, synthetic inputs):

* **policies**: P-policy evaluation (``steps.map_policies``, P = 1..256 allocations of one
  batch) against its limit, P x the full-precision forward of the batch; one vmap and chunks;
  absolute examples/s (P x B per second);
* **static**: traced bits (one compile, an int array argument) against static bits (a Python
  tuple through ``static_argnums``: one compile per allocation), compile included;
* **certify**: ``audit.certify`` on the cnn (exact worst case, budget 4 over {2..8}) against
  ``audit.exhaustive``; on the ResNet-18 certify alone, node-limited;
* **stage_b**: the stage-B step (``steps.make_pair_train_step``, P = 8 samples, quant batch 32,
  batch 64): steps/s;
* **memory**: the compiled P-policy evaluation's temporary memory against P
  (``memory_analysis``), plus the device's peak bytes where the backend reports them.

Each item writes ``DIR/bench_<item>.json``; an item that fails records its error and the rest
still run. ``report`` gathers those, ``DIR/tests.json`` and ``DIR/pair/`` (written by the shell
script) into ``DIR/report.md`` and ``DIR/report.json``, with the device name and the tuning
entries (``backend.POLICY_CHUNK_EXAMPLES``, ``backend.GRAD_CHUNK_EXAMPLES``) the measurements
suggest for this backend.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
import traceback
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ptq_adversary import audit, models, policy, steps  # noqa: E402

CHOICES = (2, 3, 4, 5, 6, 8)
DRY_FLAG = " --cpu-dry-run"
ITEMS = ("policies", "static", "certify", "stage_b", "memory")


# ------------------------------------------------------------------------------ set-up
def _models(dry: bool) -> dict[str, dict[str, Any]]:
    """The two benchmark models: name -> model, graphdef, params, rest, input shape, batch."""
    specs = {
        "cnn": dict(name="cnn", in_channels=1, image_size=28, kwargs={}, batch=128),
        "resnet18": dict(name="resnet18", in_channels=3, image_size=32, kwargs={}, batch=128),
    }
    if dry:  # the code paths only: a ResNet compile alone costs a minute on 2 CPU cores
        specs = {"cnn": {**specs["cnn"], "batch": 16}}
    out = {}
    for key, s in specs.items():
        model = models.create_model(
            s["name"], num_classes=10, in_channels=s["in_channels"],
            image_size=s["image_size"], weight_bits=8, rngs=nnx.Rngs(0), **s["kwargs"],
        )  # fmt: skip
        graphdef, params, rest = models.split_model(model)
        shape = (s["image_size"], s["image_size"], s["in_channels"])
        out[key] = dict(model=model, graphdef=graphdef, params=params, rest=rest, shape=shape,
                        batch=s["batch"], sites=model.num_sites)  # fmt: skip
    return out


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def _median_s(fn, *, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (blocking on its result) after ``warmup`` calls."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _data(m: dict[str, Any], seed: int = 0) -> tuple[jax.Array, jax.Array]:
    key = jax.random.PRNGKey(seed)
    images = jax.random.normal(key, (m["batch"], *m["shape"]))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (m["batch"],), 0, 10)
    return images, labels


def _bits(shape: tuple[int, ...], seed: int) -> jax.Array:
    idx = jax.random.randint(jax.random.PRNGKey(seed), shape, 0, len(CHOICES))
    return jnp.asarray(CHOICES, jnp.int32)[idx]


def _sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return correct, loss


def _many(graphdef, chunk: int | None):
    def fn(params, rest, images, labels, bits_pbl):
        one = lambda b: _sums(models.apply_model(graphdef, params, rest, images, b)[0], labels)
        return steps.map_policies(one, bits_pbl, chunk=chunk)

    return jax.jit(fn)


# ------------------------------------------------------------------------------ items
def bench_policies(ms: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """P-policy evaluation vs P x FP forward, per model, P and chunk."""
    plan = (1, 2) if dry else (1, 4, 16, 64, 256)
    reps = 1 if dry else 5
    rows, suggest = [], {}
    for name, m in ms.items():
        images, labels = _data(m)
        args = (m["params"], m["rest"], images, labels)
        fp = jax.jit(
            lambda p, r, x, y, g=m["graphdef"]: _sums(models.apply_model(g, p, r, x)[0], y)
        )
        fp_s = _median_s(functools.partial(fp, *args), reps=reps * 2)
        best_chunk_examples = []
        for num in plan:
            bits = _bits((num, m["batch"], m["sites"]), num)
            chunks = sorted({num, *(c for c in (1, 4, 16, 64) if c < num)})
            times = {}
            for c in chunks:
                fn = _many(m["graphdef"], c)
                times[c] = _median_s(functools.partial(fn, *args, bits), reps=reps)
            limit = num * fp_s
            best = min(times, key=times.get)
            if num >= (2 if dry else 16):  # many policies: what the table is for
                best_chunk_examples.append(best * m["batch"])
            for c, t in times.items():
                rows.append({
                    "model": name, "P": num, "chunk": c, "B": m["batch"], "ms": 1e3 * t,
                    "examples/s": num * m["batch"] / t, "x limit": t / limit, "best": c == best,
                })  # fmt: skip
            rows.append({"model": name, "P": num, "chunk": "limit (P x FP)", "B": m["batch"],
                         "ms": 1e3 * limit, "examples/s": num * m["batch"] / limit,
                         "x limit": 1.0})  # fmt: skip
        if best_chunk_examples:
            suggest[name] = int(np.median(best_chunk_examples))
    worst = max(r["x limit"] for r in rows if r.get("best"))
    return {"rows": rows, "worst_best_x_limit": worst, "suggested_policy_chunk_examples": suggest}


def bench_static(ms: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """Traced bits (one compile) vs static bits (a compile per allocation), compile included."""
    num = 2 if dry else 16
    rows = []
    for name, m in ms.items():
        images, _ = _data(m)
        g, p, r = m["graphdef"], m["params"], m["rest"]
        allocs = np.asarray(_bits((num, m["sites"]), 7))
        jax.clear_caches()
        traced = jax.jit(lambda p, r, x, b, g=g: models.apply_model(g, p, r, x, b)[0])
        t0 = time.perf_counter()
        for a in allocs:
            _block(traced(p, r, images, jnp.broadcast_to(jnp.asarray(a), (m["batch"], m["sites"]))))
        traced_s = time.perf_counter() - t0

        @functools.partial(jax.jit, static_argnums=3)
        def static(p, r, x, b, g=g):
            bits = jnp.broadcast_to(jnp.asarray(b, jnp.int32), (x.shape[0], len(b)))
            return models.apply_model(g, p, r, x, bits)[0]

        t0 = time.perf_counter()
        for a in allocs:
            _block(static(p, r, images, tuple(int(v) for v in a)))
        static_s = time.perf_counter() - t0
        rows.append({"model": name, "allocations": num, "traced s": traced_s,
                     "static s": static_s, "static / traced": static_s / traced_s})  # fmt: skip
    return {"rows": rows}


def bench_certify(ms: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """Exact worst case on the cnn (certify vs exhaustive); node-limited certify on ResNet-18."""
    rows = []
    cnn = ms["cnn"]
    n = 16 if dry else 512
    images = jax.random.normal(jax.random.PRNGKey(3), (n, *cnn["shape"]))
    labels = jnp.argmax(models.apply_model(cnn["graphdef"], cnn["params"], cnn["rest"],
                                           images)[0], -1)  # fmt: skip
    budget = policy.Budget(choices=CHOICES, num_sites=cnn["sites"], budget=4.0)
    allocations = np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))
    for _ in range(1 if dry else 2):  # the first run compiles; the second is timed
        t0 = time.perf_counter()
        _, correct = audit.exhaustive(cnn["model"], images, labels, allocations)
        ex_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = audit.certify(cnn["model"], images, labels, budget)
        ce_s = time.perf_counter() - t0
    worst = float(np.mean(np.all(np.asarray(correct), axis=0)))
    rows.append({"model": "cnn", "examples": n, "method": "exhaustive", "s": ex_s,
                 "examples/s": n / ex_s, "worst-case accuracy": worst})  # fmt: skip
    rows.append({"model": "cnn", "examples": n, "method": "certify", "s": ce_s,
                 "examples/s": n / ce_s, "worst-case accuracy": res.accuracy,
                 "exact": res.exact, "equal": res.accuracy == worst})  # fmt: skip
    if "resnet18" not in ms:  # the dry run
        return {"rows": rows}
    rn = ms["resnet18"]
    n = 64
    images = jax.random.normal(jax.random.PRNGKey(4), (n, *rn["shape"]))
    labels = jnp.argmax(models.apply_model(rn["graphdef"], rn["params"], rn["rest"],
                                           images)[0], -1)  # fmt: skip
    rb = policy.Budget(choices=CHOICES, num_sites=rn["sites"], budget=4.0)
    t0 = time.perf_counter()
    res = audit.certify(rn["model"], images, labels, rb, node_limit=32)
    s = time.perf_counter() - t0
    rows.append({"model": "resnet18", "examples": n, "method": "certify (node limit)", "s": s,
                 "examples/s": n / s, "worst-case accuracy": res.accuracy,
                 "certified accuracy": res.certified_accuracy})  # fmt: skip
    return {"rows": rows}


def _pair_step(m: dict[str, Any], num_samples: int, chunk: int | None):
    budget = policy.Budget(choices=CHOICES, num_sites=m["sites"], budget=4.0)
    pol = policy.PolicyNet(
        num_sites=m["sites"], num_choices=len(CHOICES), in_channels=m["shape"][-1],
        widths=(8, 16), rngs=nnx.Rngs(0),
    )  # fmt: skip
    pg, pp, pr = nnx.split(pol, nnx.Param, ...)
    opt, popt = optax.adamw(1e-3), optax.adam(3e-3)
    state = steps.create_pair_state(m["params"], m["rest"], opt, pp, pr, popt, 0)
    step = jax.jit(steps.make_pair_train_step(
        m["graphdef"], pg, opt, popt, budget, mode="detrimental", num_samples=num_samples,
        temperature=4.0, quant_weight=0.1, margin=5.0, reward="kl", entropy_coef=0.01,
        quant_batch=min(32, m["batch"]), chunk=chunk,
    ))  # fmt: skip
    return state, step


def bench_stage_b(ms: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """Stage-B step throughput, P = 8 samples, batch 64 (quant batch 32), per chunk."""
    rows, suggest = [], {}
    num_samples = 8
    for name, m in ms.items():
        m = {**m, "batch": 16 if dry else 64}
        images, labels = _data(m)
        teacher = jax.random.normal(jax.random.PRNGKey(5), (m["batch"], 10))
        best = None
        for chunk in (num_samples, 2) if not dry else (num_samples,):
            state, step = _pair_step(m, num_samples, chunk)
            state, _ = step(state, images, labels, teacher)  # compile
            _block(state)
            count = 1 if dry else 20
            t0 = time.perf_counter()
            for _ in range(count):
                state, out = step(state, images, labels, teacher)
            _block(out)
            s = (time.perf_counter() - t0) / count
            rows.append({"model": name, "P": num_samples, "chunk": chunk, "batch": m["batch"],
                         "ms/step": 1e3 * s, "steps/s": 1.0 / s})  # fmt: skip
            if best is None or s < best[1]:
                best = (chunk, s)
        suggest[name] = best[0] * min(32, m["batch"])
    return {"rows": rows, "suggested_grad_chunk_examples": suggest}


def bench_memory(ms: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """Compiled temporary memory of the P-policy evaluation against P (one vmap and chunks)."""
    plan = (2,) if dry else (1, 16, 64, 256)
    rows = []
    for name, m in ms.items():
        images, labels = _data(m)
        args = (m["params"], m["rest"], images, labels)
        for num in plan:
            bits = _bits((num, m["batch"], m["sites"]), num)
            for label, chunk in (("one vmap", num), ("chunk 4", min(4, num))):
                compiled = _many(m["graphdef"], chunk).lower(*args, bits).compile()
                mem = compiled.memory_analysis()
                temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
                rows.append({"model": name, "P": num, "mode": label, "B": m["batch"],
                             "temp MiB": None if temp is None else temp / 2**20})  # fmt: skip
    stats = jax.devices()[0].memory_stats() or {}
    return {"rows": rows, "device_peak_bytes": stats.get("peak_bytes_in_use")}


BENCHES = {"policies": bench_policies, "static": bench_static, "certify": bench_certify,
           "stage_b": bench_stage_b, "memory": bench_memory}  # fmt: skip


def run_bench(out: pathlib.Path, dry: bool, budget_s: float) -> None:
    ms = _models(dry)
    start = time.perf_counter()
    for item in ITEMS:
        path = out / f"bench_{item}.json"
        if time.perf_counter() - start > budget_s:
            result = {"error": f"skipped: the bench budget of {budget_s:.0f} s was spent"}
        else:
            t0 = time.perf_counter()
            try:
                result = BENCHES[item](ms, dry)
            except Exception as err:  # noqa: BLE001  (recorded; the other items still run)
                result = {"error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            result["wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"bench {item}: {'error' if 'error' in result else 'ok'} "
              f"({result.get('wall_s', 0):.0f} s)", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------ report
def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else ("yes" if v else "no")
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _read(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "python": sys.version.split()[0]}  # fmt: skip


def write_report(out: pathlib.Path, dry: bool) -> dict[str, Any]:
    """``report.md`` and ``report.json`` from what the phases wrote to ``out``."""
    info = device_info()
    phases = _read(out / "phases.json") or {}
    report: dict[str, Any] = {"device": info, "dry_run": dry, "phases": phases}
    title = "# Accelerator check" + (" (CPU dry run: tiny sizes, not results)" if dry else "")
    command = "bash experiments/accelerator_check.sh" + (DRY_FLAG if dry else "")
    lines = [title, "", f"- device: {info['device']} ({info['backend']}, "
             f"{info['device_count']} device(s)); jax {info['jax']}, Python {info['python']}",
             f"- command: `{command}`"]  # fmt: skip
    for name, p in phases.items():
        lines.append(f"- phase {name}: {p.get('status')} in {p.get('seconds', 0):.0f} s")
    tests = _read(out / "tests.json")
    report["tests"] = tests
    lines += ["", "## Test suite on this backend", ""]
    if tests:
        lines.append(", ".join(f"{k} {v}" for k, v in tests.get("counts", {}).items()))
        for r in tests.get("failed", [])[:30]:
            lines.append(f"- failed: `{r}`")
    else:
        lines.append("not run")
    report["bench"] = {}
    for item in ITEMS:
        result = _read(out / f"bench_{item}.json")
        report["bench"][item] = result
        lines += ["", f"## {item}", ""]
        if result is None:
            lines.append("not run")
        elif "error" in result:
            lines.append(f"error: {result['error']}")
        else:
            lines.append(_table(result["rows"]))
            for key, value in result.items():
                if key not in ("rows", "wall_s"):
                    lines.append(f"\n- {key}: {value}")
    tuning = {}
    pol = report["bench"].get("policies") or {}
    grad = report["bench"].get("stage_b") or {}
    if pol.get("suggested_policy_chunk_examples"):
        tuning["backend.POLICY_CHUNK_EXAMPLES"] = {
            info["backend"]: min(pol["suggested_policy_chunk_examples"].values())
        }
    if grad.get("suggested_grad_chunk_examples"):
        tuning["backend.GRAD_CHUNK_EXAMPLES"] = {
            info["backend"]: min(grad["suggested_grad_chunk_examples"].values())
        }
    report["suggested_tuning"] = tuning
    lines += ["", "## Suggested tuning entries", "",
              "From the fastest chunk measured (smallest over the two models):", "",
              "```", json.dumps(tuning, indent=1), "```"]  # fmt: skip
    pair = _read(out / "pair" / "results.json")
    report["pair"] = pair
    lines += ["", "## Shortened ResNet-18 Fashion-MNIST pair run", ""]
    if pair:
        rows = [{"pair": mode, **{k: r.get(k) for k in ("fp_accuracy", "dptq_accuracy", "drop",
                                                        "uniform_drop", "random_drop")}}
                for mode, r in pair.get("pairs", {}).items()]  # fmt: skip
        lines.append(_table(rows))
        lines.append(f"\n- time per stage (s): {pair.get('time_s')}")
    else:
        lines.append("not run or not finished in the time left")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("bench", "report"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=180.0, help="bench items start within")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "bench":
        run_bench(out, args.dry_run, args.budget_s)
    else:
        write_report(out, args.dry_run)
        print(f"wrote {out / 'report.md'} and report.json")


if __name__ == "__main__":
    main()
