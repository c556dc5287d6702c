r"""Certify at depth: the bracket [certified, found] on a ResNet-20 (enumeration impossible).

  python experiments/certify_scale.py --model=runs/resnet20/teacher/model \
      [--out=experiments/results/certify] [--examples=1000] [--node-limit=64]

The model: a zoo ``resnet20`` (21 sites: 19 convs after the stem, 2 projection shortcuts, the
head) trained on Fashion-MNIST with
``python -m ptq_adversary.main --config=configs/fmnist_cnn.py:model=resnet20,epochs=2
--workdir=runs/resnet20/teacher`` (7.3 min here, 90.90 % test accuracy).

For budgets 4, 5 and 6 over choices {2,3,4,5,6,8}, and budget 6 over {4,5,6,8}, on the first
``--examples`` test images, it runs the audit with ``uniform``, ``random`` (random search),
``beam`` and ``certify`` (whose candidate leaves are the searches' finds; node limit
``--node-limit`` per example) and reports the bracket: ``certified_accuracy`` (proved) and
``accuracy`` (found), its width, and each method's time (``scale.{json,md}``,
``bracket_vs_budget.png``).

Then it measures what limits the width:

* **depth**: from the node that fixes the first ``L - m`` sites at the uniform allocation, the
  share of examples whose margin bound is positive with ``m`` sites left free, with intervals
  alone and with the linear relaxation (on 256 images). Certification needs every node of an
  example's tree certified; a bound that only certifies with ``m`` sites left leaves
  ``~|choices|^(L - m)`` nodes per example to evaluate.
* **growth**: the mean width of the interval enclosure at each cut when every site is free,
  i.e. how fast the enclosure grows layer by layer.

Runtime: 47 min on the 2-core CPU (with other jobs on the same cores), most of it the searches.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import bench_lib  # noqa: E402

from ptq_adversary import artifacts, audit, data, plotting, policy  # noqa: E402

C6 = (2, 3, 4, 5, 6, 8)
C4 = (4, 5, 6, 8)
RUNS = ((C6, 4.0), (C6, 5.0), (C6, 6.0), (C4, 6.0))
METHODS = ("uniform", "random", "beam", "certify")


def brackets(model, images, labels, node_limit: int) -> list[dict]:
    rows = []
    for choices, budget in RUNS:
        t0 = time.perf_counter()
        result = audit.audit(
            model, images, labels, choices=choices, budget=budget, methods=METHODS,
            certify_node_limit=node_limit, progress=False,
        )  # fmt: skip
        s = result.summary()
        m = s["methods"]
        c = m["certify"]
        row = {
            "choices": list(choices),
            "budget": budget,
            "fp_accuracy": s["fp_accuracy"],
            "uniform": m["uniform"]["accuracy"],
            "random_search": m["random_search"]["accuracy"],
            "beam": m["beam"]["accuracy"],
            "certified": c["certified_accuracy"],
            "found": c["accuracy"],
            "width_points": round(100 * (c["accuracy"] - c["certified_accuracy"]), 2),
            "exact": c["exact"],
            "states": c["states"],
            "nodes": c["nodes"],
            "bounded_per_depth": c["bounded_per_depth"],
            "pruned_per_depth": c["pruned_per_depth"],
            "seconds": {k: v["seconds"] for k, v in m.items()},
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def depth_profile(model, images, labels, choices, budget_mean: float) -> list[dict]:
    """Share certified from the uniform-prefix node with ``m`` sites left, both relaxations."""
    qfn, state = model.program()
    n, num_sites = len(labels), qfn.num_sites
    budget = policy.Budget(choices, num_sites, budget_mean)
    uniform = np.asarray(policy.to_bits(policy.uniform_allocation(budget), budget), np.int32)
    bits = jnp.broadcast_to(jnp.asarray(uniform), (n, num_sites))
    lives = [qfn.run_segments(state, images, bits, 0, 0)]
    for k in range(1, num_sites):
        lives.append(qfn.run_segments(state, lives[-1], bits, k, k))
    rows = []
    for free in (1, 2, 3, 4, 6, 8, num_sites):
        start = num_sites - free + 1  # segment after the fixed sites' cut
        rem = budget.total - int(uniform[: start - 1].sum())
        allowed = [c for c in choices if 0 <= rem - c < budget.reachable.shape[1]
                   and budget.reachable[free - 1, rem - c]]  # fmt: skip
        low = jnp.full((n, num_sites), min(allowed), jnp.int32)
        row = {"sites_free": free, "from_site": qfn.site_names[start - 1]}
        for name, kw in (("interval", {}), ("linear", {"choices": choices, "remaining": rem})):
            t0 = time.perf_counter()
            fn = lambda lv, lo, s=start, kw=kw: qfn.bound_margins(state, lv, labels, lo, s, **kw)
            lb = jax.jit(fn)(lives[start - 1], low)
            lb = np.asarray(lb).min(axis=1)
            row[name] = {"certified": float(np.mean(lb > 0)), "median_bound": float(np.median(lb)),
                         "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def growth(model, images, choices) -> list[dict]:
    """Mean enclosure width at each cut with every site free at its smallest choice."""
    qfn, state = model.program()
    n, num_sites = images.shape[0], qfn.num_sites
    live = qfn.run_segments(state, images, jnp.zeros((n, num_sites), jnp.int32), 0, 0)
    low = jnp.full((n, num_sites), min(choices), jnp.int32)
    rows = []
    for stop in range(1, num_sites + 1):
        out = jax.jit(lambda lv, s=stop: qfn.bound_segments(state, lv, low, 1, s))(live)
        pairs = [out] if stop == num_sites else list(out)
        widths = [float(jnp.mean(hi - lo)) for lo, hi in pairs]
        rows.append({"after_site": qfn.site_names[stop - 1], "mean_width": max(widths)})
    return rows


def plot(rows: list[dict], path: str) -> None:
    plt = plotting.pyplot()
    c6 = [r for r in rows if tuple(r["choices"]) == C6]
    b = [r["budget"] for r in c6]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(b, [100 * r["certified"] for r in c6], [100 * r["found"] for r in c6],
                    color="tab:red", alpha=0.25, label="bracket [certified, found]")  # fmt: skip
    for key, style in (("uniform", "o-"), ("random_search", "s--"), ("beam", "^-.")):
        ax.plot(b, [100 * r[key] for r in c6], style, label=key.replace("_", " "))
    ax.plot(b, [100 * r["certified"] for r in c6], "k.-", label="certified")
    ax.axhline(100 * c6[0]["fp_accuracy"], color="k", ls=":", label="full precision")
    ax.set_xlabel("mean activation bits per site (choices {2,3,4,5,6,8})")
    ax.set_ylabel("worst-case accuracy (%)")
    ax.set_title("ResNet-20 (21 sites), Fashion-MNIST: the certify bracket", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(res: dict) -> str:
    lines = [
        "# certify at depth: ResNet-20 (21 sites) on Fashion-MNIST",
        "",
        f"{res['examples']} test images; {res['hardware']}; node limit {res['node_limit']} per "
        "example. Command: `python experiments/certify_scale.py --model=<dir>`.",
        "",
        "| choices | budget | FP | uniform | random search | beam | certified | found | "
        "width (pts) | certified / broken / unknown | certify nodes | "
        "time: searches + certify (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in res["brackets"]:
        st = r["states"]
        sec = r["seconds"]
        lines.append(
            f"| {r['choices']} | {r['budget']:g} | {100 * r['fp_accuracy']:.1f}% | "
            f"{100 * r['uniform']:.1f}% | {100 * r['random_search']:.1f}% | {100 * r['beam']:.1f}% "
            f"| {100 * r['certified']:.1f}% | {100 * r['found']:.1f}% | {r['width_points']:.1f} | "
            f"{st['certified']} / {st['broken']} / {st['unknown']} | {r['nodes']} | "
            f"{sec['random_search'] + sec['beam']:.0f} + {sec['certify']:.0f} |"
        )
    for key, title in (("depth_c4", "{4,5,6,8}, budget 6"), ("depth_c6", "{2,...,8}, budget 6")):
        lines += [
            "",
            f"## What limits it: certified share vs sites left free ({title}, 256 images)",
            "",
            "From the node fixing the other sites at the uniform allocation: share of examples "
            "with a positive margin bound (median bound in brackets).",
            "",
            "| sites free | from site | intervals | linear relaxation |",
            "|---:|---|---:|---:|",
        ]
        for r in res[key]:
            i, li = r["interval"], r["linear"]
            lines.append(
                f"| {r['sites_free']} | {r['from_site']} | {100 * i['certified']:.1f}% "
                f"({i['median_bound']:.3g}) | {100 * li['certified']:.1f}% "
                f"({li['median_bound']:.3g}) |"
            )
    lines += ["", "## Enclosure growth with every site free at 4 bits (intervals, 64 images)",
              "", "| after site | mean width |", "|---|---:|"]  # fmt: skip
    for r in res["growth"]:
        lines.append(f"| {r['after_site']} | {r['mean_width']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/resnet20/teacher/model")
    ap.add_argument("--out", default="experiments/results/certify")
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--node-limit", type=int, default=64)
    args = ap.parse_args()
    loaded = artifacts.load_model(args.model)
    model = nnx.merge(loaded.graphdef, loaded.params, loaded.rest)
    dataset = data.load_dataset("fashion_mnist", val_size=5000, split_seed=0)
    n = min(args.examples, len(dataset.test))
    images = np.asarray(data.normalize(dataset.test.images[:n], dataset.mean, dataset.std))
    labels = np.asarray(dataset.test.labels[:n])
    res = {"hardware": bench_lib.hardware_line(), "examples": n, "node_limit": args.node_limit}
    t0 = time.perf_counter()
    res["depth_c4"] = depth_profile(model, images[:256], labels[:256], C4, 6.0)
    res["depth_c6"] = depth_profile(model, images[:256], labels[:256], C6, 6.0)
    res["growth"] = growth(model, images[:64], C4)
    res["brackets"] = brackets(model, images, labels, args.node_limit)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "scale.md"), "w", encoding="utf-8") as f:
        f.write(markdown(res))
    plot(res["brackets"], os.path.join(args.out, "bracket_vs_budget.png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
