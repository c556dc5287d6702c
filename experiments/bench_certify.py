"""The exact worst-case accuracy: certify (branch and bound) vs enumeration vs the naive loop.

On the default pipeline's trained student (``cnn``, 4 sites; choices {2,3,4,5,6,8}, budget 4:
109 feasible allocations) and the first 1000 Fashion-MNIST test images (256 with ``--quick``),
the exact per-example worst case is computed three ways, timed side by side (round robin,
``bench_lib.time_interleaved``, after a warm-up that compiles everything):

* **naive loop**: one jitted full forward pass per allocation (109 calls per batch of 256);
* **exhaustive** (``audit.exhaustive``): the prefix-shared enumeration;
* **certify** (``audit.certify``, defaults): candidate leaves (uniform, low-bit) first, then
  branch and bound; a broken example leaves the search at its first misclassifying leaf, a
  certified node's subtree is never evaluated. Also with ``bounds=False`` (break-pruning
  alone) and ``bounds=True`` (linear-relaxation bounds at every depth).

All three must give the same per-example broken flags (checked). The trained student is read
from ``$PTQ_PIPELINE/student/model`` (default ``runs/fmnist_pair``, what ``make run`` fills);
without it the bench reports itself as not run.

  PTQ_PIPELINE=runs/fmnist_pair python experiments/bench_certify.py [--quick]
"""

from __future__ import annotations

import os
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ptq_adversary import artifacts, audit, data, models, policy

NAME = "certify: exact worst case"
GOAL = "certify's exact worst-case accuracy >= 3x faster than the naive per-allocation loop"
CHOICES = (2, 3, 4, 5, 6, 8)


def _student():
    root = os.environ.get("PTQ_PIPELINE", "runs/fmnist_pair")
    path = os.path.join(root, "student", "model")
    if not artifacts.exists(path):
        return None, path
    loaded = artifacts.load_model(path)
    return nnx.merge(loaded.graphdef, loaded.params, loaded.rest), path


def run(quick: bool = False) -> dict[str, Any]:
    """Times the three paths; ratio = naive loop / certify (defaults)."""
    model, path = _student()
    if model is None:
        return {"name": NAME, "goal": GOAL, "ratio": None, "met": None,
                "rows": [{"error": f"no trained student at {path}: run `make run` first "
                          "or set PTQ_PIPELINE"}]}  # fmt: skip
    n, rounds = (256, 2) if quick else (1000, 3)
    dataset = data.load_dataset("fashion_mnist", val_size=5000, split_seed=0)
    images = np.asarray(data.normalize(dataset.test.images[:n], dataset.mean, dataset.std))
    labels = np.asarray(dataset.test.labels[:n])
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    allocs = np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))
    graphdef, params, rest = models.split_model(model)
    batches = [jnp.asarray(images[i : i + 256]) for i in range(0, n, 256)]

    @jax.jit
    def one(x, bits_l):
        bits = jnp.broadcast_to(bits_l, (x.shape[0], bits_l.shape[0]))
        return jnp.argmax(models.apply_model(graphdef, params, rest, x, bits)[0], -1)

    alloc_dev = [jnp.asarray(a) for a in allocs]
    results: dict[str, Any] = {}

    def keep(name, value):
        results[name] = value
        return np.zeros(())

    fns = {
        "naive loop (1 jitted pass per allocation)": lambda: [one(x, a) for x in batches
                                                              for a in alloc_dev],
        "exhaustive (prefix-shared enumeration)": lambda: keep(
            "exhaustive", audit.exhaustive(model, images, labels, allocs)),
        "certify (defaults: auto bounds, linear relaxation)": lambda: keep(
            "certify", audit.certify(model, images, labels, budget)),
        "certify, bounds off (break-pruning alone)": lambda: keep(
            "certify_off", audit.certify(model, images, labels, budget, bounds=False)),
        "certify, bounds at every depth": lambda: keep(
            "certify_on", audit.certify(model, images, labels, budget, bounds=True)),
    }  # fmt: skip
    times = bench_lib.time_interleaved(fns, rounds=rounds, warmup=1)

    preds = np.stack([np.concatenate([np.asarray(one(x, a)) for x in batches]) for a in alloc_dev])
    naive_broken = (preds != labels[None]).any(axis=0)
    exh_broken = ~results["exhaustive"][1].all(axis=0)
    loop = times["naive loop (1 jitted pass per allocation)"]["median_s"]
    rows, same = [], bool(np.array_equal(naive_broken, exh_broken))
    for name, t in times.items():
        key = {"certify (defaults": "certify", "certify, bounds off": "certify_off",
               "certify, bounds at every depth": "certify_on"}  # fmt: skip
        r = next((results[v] for k, v in key.items() if name.startswith(k)), None)
        row = {"method": name, "median_s": round(t["median_s"], 3),
               "naive / this": round(loop / t["median_s"], 2)}  # fmt: skip
        if r is not None:
            same &= bool(np.array_equal(r.broken, naive_broken)) and r.exact
            row.update({
                "nodes": int(r.nodes.sum()),
                "leaves": r.leaves,
                "bounded": r.bound_calls,
                "pruned": r.pruned,
                "exact": r.exact,
            })  # fmt: skip
        rows.append(row)
    c = results["certify"]
    exh = times["exhaustive (prefix-shared enumeration)"]["median_s"]
    t_cert = times["certify (defaults: auto bounds, linear relaxation)"]["median_s"]
    ratio = loop / t_cert
    notes = [
        f"{len(allocs)} allocations x {n} examples; student from {path}",
        f"worst-case accuracy {100 * c.accuracy:.2f}% (certified {100 * c.certified_accuracy:.2f}"
        f"%); per-example broken flags identical across all paths: {same}",
        f"certify vs exhaustive: {exh / t_cert:.2f}x; states {c.summary()['states']}",
        f"bounded / pruned per depth (defaults): {c.bounded_per_depth.tolist()} / "
        f"{c.pruned_per_depth.tolist()}; bounds at every depth: "
        f"{results['certify_on'].bounded_per_depth.tolist()} / "
        f"{results['certify_on'].pruned_per_depth.tolist()}",
    ]
    return {
        "name": NAME,
        "goal": GOAL,
        "metric": "naive loop time / certify time",
        "ratio": round(ratio, 2),
        "met": bool(ratio >= 3.0 and same),
        "rows": rows,
        "notes": notes,
    }


if __name__ == "__main__":
    bench_lib.main(run)
