r"""Does ``certify`` close the bracket? Exactness against enumeration on the whole test split.

  python experiments/certify_exactness.py --pipeline=runs/fmnist_pair \
      [--out=experiments/results/certify] [--examples=10000]

For the stage-A student and both pairs' selected networks of a pipeline workdir
(configs/fmnist_pair.py), on the Fashion-MNIST test images, at the pipeline's budget (choices
{2,3,4,5,6,8}, mean 4 bits: 109 feasible allocations for the 4-site CNN), this runs

* ``audit.exhaustive``: every allocation on every example (the exact worst case), and
* ``audit.certify`` with its defaults (candidates: the uniform and low-bit allocations;
  ``bounds="auto"``, ``relaxation="linear"``), and with ``--every-depth`` once more with
  bounds on at every depth,

and reports whether certify's bracket closed (``exact``), whether its accuracy equals the
enumeration's and its per-example broken flags are identical, with the time, nodes, bounded and
pruned nodes per depth, as ``exactness.{json,md}``. Each call is run once after a warm-up on 64
images (compiles excluded). Runtime: ~5 min on the 2-core CPU for 10 000 images (twice
that with ``--every-depth``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import bench_lib  # noqa: E402

from ptq_adversary import analysis, artifacts, audit, data, policy  # noqa: E402

CHOICES = (2, 3, 4, 5, 6, 8)
BUDGET = 4.0


def load(pipeline: str, source: str):
    """The network of a pipeline stage (``student``) or pair (``robust`` / ``detrimental``)."""
    if source == "student":
        loaded = artifacts.load_model(os.path.join(pipeline, "student", "model"))
    else:
        loaded, _ = analysis.load_pair(pipeline, source)
    return nnx.merge(loaded.graphdef, loaded.params, loaded.rest)


def run_one(model, images, labels, every: bool) -> dict:
    budget = policy.Budget(CHOICES, model.num_sites, BUDGET)
    allocs = np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))
    audit.exhaustive(model, images[:64], labels[:64], allocs)  # compiles
    t0 = time.perf_counter()
    _, correct = audit.exhaustive(model, images, labels, allocs)
    t_exh = time.perf_counter() - t0
    broken = ~correct.all(axis=0)
    out = {"num_allocations": len(allocs), "exhaustive_accuracy": float(np.mean(~broken)),
           "exhaustive_s": round(t_exh, 1), "certify": {}}  # fmt: skip
    variants = [("auto", {})] + ([("bounds at every depth", {"bounds": True})] if every else [])
    for label, kw in variants:
        audit.certify(model, images[:64], labels[:64], budget, **kw)  # compiles
        r = audit.certify(model, images, labels, budget, **kw)
        out["certify"][label] = {
            "certified_accuracy": r.certified_accuracy,
            "accuracy": r.accuracy,
            "exact": r.exact,
            "same_broken_flags": bool(np.array_equal(r.broken, broken)),
            "mismatches": int(np.sum(r.broken != broken)),
            "seconds": round(r.seconds, 1),
            "speedup_vs_exhaustive": round(t_exh / r.seconds, 2),
            "nodes": int(r.nodes.sum()),
            "leaves": r.leaves,
            "bounded_per_depth": r.bounded_per_depth.tolist(),
            "pruned_per_depth": r.pruned_per_depth.tolist(),
            "states": r.summary()["states"],
        }
        print(label, json.dumps(out["certify"][label]), flush=True)
    return out


def markdown(results: dict, hw: str, n: int) -> str:
    lines = [
        "# certify vs exhaustive enumeration: exactness",
        "",
        f"{n} Fashion-MNIST test images, choices {list(CHOICES)}, budget {BUDGET:g} bits; {hw}.",
        "Command: `python experiments/certify_exactness.py --pipeline=<workdir>`.",
        "",
        "| network | exhaustive acc. | exhaustive (s) | certify | bracket | exact | "
        "same broken flags | time (s) | speed-up | nodes | bounded / pruned per depth |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        for label, c in r["certify"].items():
            lines.append(
                f"| {name} | {100 * r['exhaustive_accuracy']:.2f}% | {r['exhaustive_s']} | "
                f"{label} | [{100 * c['certified_accuracy']:.2f}%, {100 * c['accuracy']:.2f}%] "
                f"| {c['exact']} | {c['same_broken_flags']} ({c['mismatches']} differ) | "
                f"{c['seconds']} | {c['speedup_vs_exhaustive']}x | {c['nodes']} | "
                f"{c['bounded_per_depth']} / {c['pruned_per_depth']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default="runs/fmnist_pair")
    ap.add_argument("--out", default="experiments/results/certify")
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--every-depth", action="store_true", help="also with bounds=True")
    args = ap.parse_args()
    dataset = data.load_dataset("fashion_mnist", val_size=5000, split_seed=0)
    n = min(args.examples, len(dataset.test))
    images = np.asarray(data.normalize(dataset.test.images[:n], dataset.mean, dataset.std))
    labels = np.asarray(dataset.test.labels[:n])
    hw = bench_lib.hardware_line()
    results = {}
    for source in ("student", "robust", "detrimental"):
        print(f"== {source}", flush=True)
        results[source] = run_one(load(args.pipeline, source), images, labels, args.every_depth)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "exactness.json"), "w", encoding="utf-8") as f:
        json.dump({"hardware": hw, "examples": n, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "exactness.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results, hw, n))
    print(markdown(results, hw, n))


if __name__ == "__main__":
    main()
