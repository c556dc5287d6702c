"""Scaling: cost per example vs batch size, and cost vs the number of quantization sites.

1. Batch size: the default student (``cnn``) at B = 16 ... 1024: full-precision forward,
   quantized forward (random per-example bits) and quantized forward + backward (stage B's
   network gradient, BatchNorm frozen), in microseconds per example. On XLA:CPU the cost per
   example rises once a call holds a few hundred examples; that is what
   ``backend.POLICY_CHUNK_EXAMPLES`` (the chunk ``steps.map_policies`` aims for) rests on.
2. Sites: ``cnn`` variants with 2 to 8 convolutions (sites = convs - 1 + head) and a
   ResNet-20 at half width (21 sites), batch 128: FP and quantized forward time, and their
   ratio (the cost of fake-quantizing every site).

Writes ``scaling_batch.png`` and ``scaling_sites.png`` to ``plot_dir``.

  python experiments/bench_scaling.py [--quick] [--plot-dir DIR]
"""

from __future__ import annotations

import os
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp

from ptq_adversary import backend, models

NAME = "scaling with batch size and sites"
GOAL = "curves (no pass/fail): per-example cost vs batch, cost vs sites"

# (label, model name, kwargs): cnn depth variants and a half-width ResNet-20.
_WIDTHS = (16, 32, 64, 64, 64, 64, 64, 64)
_STRIDES = (1, 2, 2, 1, 1, 1, 1, 1)
SITE_MODELS = [
    (f"cnn, {n} convs", "cnn", {"widths": _WIDTHS[:n], "strides": _STRIDES[:n]}) for n in (2, 4, 8)
] + [("resnet20 x0.5", "resnet20", {"width": 0.5})]


def _fns(graphdef):
    def fp(params, rest, x, bits):
        del bits
        return models.apply_model(graphdef, params, rest, x)[0]

    def q(params, rest, x, bits):
        return models.apply_model(graphdef, params, rest, x, bits)[0]

    def q_grad(params, rest, x, bits):
        def loss(p):
            out = models.apply_model(graphdef, p, rest, x, bits, train=True, frozen_bn=True)[0]
            return jnp.sum(out**2)

        return jax.grad(loss)(params)

    return {"FP forward": jax.jit(fp), "quantized forward": jax.jit(q),
            "quantized forward+backward": jax.jit(q_grad)}  # fmt: skip


def _time_model(graphdef, params, rest, num_sites, batch, names, reps):
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 28, 28, 1))
    bits = bench_lib.random_bits(jax.random.PRNGKey(1), (batch, num_sites))
    fns = {k: v for k, v in _fns(graphdef).items() if k in names}
    calls = {k: (lambda f=f: f(params, rest, x, bits)) for k, f in fns.items()}
    budget = 4.0 + 0.01 * batch
    return bench_lib.time_interleaved(calls, rounds=reps, warmup=1, budget_s=budget)


def run(quick: bool = False, plot_dir: str | None = None) -> dict[str, Any]:
    """Both sweeps; rows per measurement; two PNG plots."""
    plot_dir = plot_dir or os.path.join(bench_lib.REPO, "experiments/results/benchmarks")
    batches = (16, 64, 256) if quick else (16, 64, 128, 256, 512)
    site_models = SITE_MODELS[1:3] if quick else SITE_MODELS
    reps = 3 if quick else 4
    rows: list[dict[str, Any]] = []

    model, graphdef, params, rest = bench_lib.make_cnn()
    names = ("FP forward", "quantized forward", "quantized forward+backward")
    per_example: dict[str, list[float]] = {k: [] for k in names}
    for batch in batches:
        timed = _time_model(graphdef, params, rest, model.num_sites, batch, names, reps)
        for k in names:
            us = 1e6 * timed[k]["median_s"] / batch
            per_example[k].append(us)
            rows.append({"sweep": "batch", "model": "cnn", "sites": model.num_sites,
                         "batch": batch, "what": k, "ms": 1e3 * timed[k]["median_s"],
                         "us/example": us})  # fmt: skip

    site_points = []
    for label, name, kwargs in site_models:
        m, g, p, r = bench_lib.make_cnn(name=name, **kwargs)
        timed = _time_model(g, p, r, m.num_sites, 128, names[:2], reps)
        fp_ms, q_ms = (1e3 * timed[k]["median_s"] for k in names[:2])
        site_points.append((label, m.num_sites, fp_ms, q_ms))
        rows.append({"sweep": "sites", "model": label, "sites": m.num_sites, "batch": 128,
                     "what": "FP / quantized forward", "ms": q_ms, "FP ms": fp_ms,
                     "quantized / FP": q_ms / fp_ms,
                     "params": models.count_params(p)})  # fmt: skip

    plots = _plot(plot_dir, batches, per_example, site_points)
    best = {k: batches[min(range(len(batches)), key=v.__getitem__)]
            for k, v in per_example.items()}  # fmt: skip
    notes = [
        f"cheapest batch per example: {best}; library default chunk target "
        f"POLICY_CHUNK_EXAMPLES = {backend.POLICY_CHUNK_EXAMPLES}",
    ]
    return {"name": NAME, "goal": GOAL, "metric": None, "ratio": None, "met": None,
            "rows": rows, "plots": plots, "notes": notes}  # fmt: skip


def _plot(plot_dir, batches, per_example, site_points) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    hw = bench_lib.hardware_line()
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, v in per_example.items():
        ax.plot(batches, v, marker="o", label=k)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("examples per call (batch size B)")
    ax.set_ylabel("time per example (µs)")
    ax.set_title("cnn student (4 sites, 28x28x1): cost per example vs batch", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, hw, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(os.path.join(plot_dir, "scaling_batch.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sites = [s for _, s, _, _ in site_points]
    ax.plot(sites, [f for _, _, f, _ in site_points], marker="o", label="FP forward")
    ax.plot(sites, [q for _, _, _, q in site_points], marker="s", label="quantized forward")
    for label, s, _, q in site_points:
        ax.annotate(label, (s, q), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("quantization sites L")
    ax.set_ylabel("time per batch of 128 (ms)")
    ax.set_title("forward cost vs number of sites (batch 128, 28x28x1)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, hw, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(os.path.join(plot_dir, "scaling_sites.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    bench_lib.main(run)
