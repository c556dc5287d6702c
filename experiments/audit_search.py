r"""Search methods at equal cost: greedy and beam search vs random search, against the exact
worst case (issue: "greedy/beam search finds at least as much damage as random search with the
same number of evaluations, and on the default CNN is compared against the exact worst case").

For each evaluation budget E (forward passes per example), greedy (beam width 1), beam search
(width 2-4), each also with random restarts and with low-bit starts (seeded with the L
allocations that put one site at the lowest choice, ``audit.low_bit_starts``), and random
search (E uniform draws from all feasible allocations) attack the same
frozen model on the same test images; the exhaustive enumeration gives the exact worst case.
Reported per method and E: accuracy under the attack (correct under every allocation
evaluated), FP-correct examples flipped, and how often the search reached the exact worst loss.

  python experiments/audit_search.py --pipeline=runs/final --source=student --examples=500 \
      --out=experiments/results/audit_search

Reads the model from a pipeline workdir (``student/model``, ``teacher/model`` or a pair's
``best/model``); writes ``search.json``, ``search.md`` and ``search.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from ptq_adversary import artifacts, audit, data, io, models, policy  # noqa: E402
from ptq_adversary.audit import evaluate  # noqa: E402

CHOICES = (2, 3, 4, 5, 6, 8)
BUDGET = 4.0
# (iterations, beam width, moves per beam entry, random initial draws, low-bit starts)
# -> E = 1 + initial draws + (4 with low-bit starts) + iterations * width * moves.
SETTINGS = {
    9: {"greedy": (2, 1, 4, 0, False), "beam": (2, 2, 2, 0, False),
        "greedy+restarts": (1, 1, 4, 4, False), "beam+restarts": (2, 2, 1, 4, False),
        "greedy+low starts": (1, 1, 4, 0, True), "beam+low starts": (1, 2, 2, 0, True)},
    17: {"greedy": (4, 1, 4, 0, False), "beam": (4, 2, 2, 0, False),
         "greedy+restarts": (2, 1, 4, 8, False), "beam+restarts": (2, 2, 2, 8, False),
         "greedy+low starts": (3, 1, 4, 0, True), "beam+low starts": (3, 2, 2, 0, True)},
    33: {"greedy": (4, 1, 8, 0, False), "beam": (4, 4, 2, 0, False),
         "greedy+restarts": (4, 1, 4, 16, False), "beam+restarts": (4, 2, 2, 16, False),
         "greedy+low starts": (7, 1, 4, 0, True), "beam+low starts": (7, 2, 2, 0, True)},
    65: {"greedy": (8, 1, 8, 0, False), "beam": (8, 4, 2, 0, False),
         "greedy+restarts": (4, 1, 8, 32, False), "beam+restarts": (4, 4, 2, 32, False),
         "greedy+low starts": (15, 1, 4, 0, True), "beam+low starts": (15, 2, 2, 0, True)},
}  # fmt: skip
_SOURCES = {
    "student": "student/model",
    "teacher": "teacher/model",
    "robust": "robust/best/model",
    "detrimental": "detrimental/best/model",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/fmnist_pair")
    parser.add_argument("--source", default="student", choices=sorted(_SOURCES))
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--budgets", default="9,17,33,65", help="evaluations per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results/audit_search")
    args = parser.parse_args()

    loaded = artifacts.load_model(os.path.join(args.pipeline, _SOURCES[args.source]))
    model = nnx.merge(loaded.graphdef, loaded.params, loaded.rest)
    ds = data.load_dataset("fashion_mnist", test_limit=args.examples)
    x = data.normalize(ds.test.images, ds.mean, ds.std)
    y = ds.test.labels
    bud = policy.Budget(CHOICES, model.num_sites, BUDGET)
    allocs = np.asarray(policy.to_bits(policy.enumerate_allocations(bud), bud))

    t0 = time.perf_counter()
    loss, correct = audit.exhaustive(model, x, y, allocs)
    exact_s = time.perf_counter() - t0
    exact_loss = loss.max(axis=0)
    fp_right = np.asarray(evaluate.fp_eval(*models.split_model(model), x, y)[1], bool)
    rows = [
        {
            "method": "exhaustive (exact)",
            "evaluations": len(allocs),
            "accuracy": float(correct.all(axis=0).mean()),
            "flip_rate": float((~correct.all(axis=0))[fp_right].mean()),
            "reached_exact_worst": 1.0,
            "seconds": round(exact_s, 1),
        }
    ]
    for e in (int(v) for v in args.budgets.split(",")):
        t0 = time.perf_counter()
        found = {"random": audit.random_search(model, x, y, bud, num_samples=e, seed=args.seed)}
        found_s = {"random": time.perf_counter() - t0}
        for name, (iters, width, moves, init, low) in SETTINGS[e].items():
            t0 = time.perf_counter()
            found[name] = audit.beam_search(
                model,
                x,
                y,
                bud,
                width=width,
                num_moves=moves,
                num_iters=iters,
                num_init=init,
                low_starts=low,
                seed=args.seed,
            )
            found_s[name] = time.perf_counter() - t0
        for name, r in found.items():
            assert r.evaluations == e, (name, r.evaluations, e)
            rows.append(
                {
                    "method": name,
                    "evaluations": e,
                    "accuracy": float((~r.broken).mean()),
                    "flip_rate": float(r.broken[fp_right].mean()),
                    "reached_exact_worst": float(np.mean(r.worst_loss >= exact_loss - 1e-6)),
                    "seconds": round(found_s[name], 1),
                }
            )
        for r in rows[-len(found) :]:
            print(f"E={e} {r['method']}: {r['accuracy']:.3f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    info = {
        "source": args.source,
        "pipeline": args.pipeline,
        "examples": len(y),
        "choices": list(CHOICES),
        "budget": BUDGET,
        "num_allocations": len(allocs),
        "fp_accuracy": float(fp_right.mean()),
        "rows": rows,
    }
    io.write_json_atomic(os.path.join(args.out, "search.json"), info)
    lines = [
        f"Search at equal cost on the {args.source} ({loaded.spec.name}) of `{args.pipeline}`, "
        f"first {len(y)} Fashion-MNIST test images, choices {list(CHOICES)}, budget {BUDGET:g} "
        f"({len(allocs)} feasible allocations); FP accuracy {fp_right.mean():.2%}.",
        "",
        "| method | evaluations / example | accuracy under attack | FP-correct flipped | "
        "reached the exact worst loss | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['evaluations']} | {r['accuracy']:.2%} | "
            f"{r['flip_rate']:.2%} | {r['reached_exact_worst']:.1%} | {r['seconds']} |"
        )
    io.write_text_atomic(os.path.join(args.out, "search.md"), "\n".join(lines) + "\n")
    _plot(rows, os.path.join(args.out, "search.png"))
    print("\n".join(lines))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    exact = rows[0]
    styles = (("random", "o--"), ("greedy", "s-"), ("beam", "^-"),
              ("greedy+restarts", "s:"), ("beam+restarts", "^:"),
              ("greedy+low starts", "s-."), ("beam+low starts", "^-."))  # fmt: skip
    for name, style in styles:
        r = [row for row in rows if row["method"] == name]
        e = [row["evaluations"] for row in r]
        axes[0].plot(e, [100 * row["accuracy"] for row in r], style, label=f"{name} search")
        axes[1].plot(e, [100 * row["reached_exact_worst"] for row in r], style, label=name)
    axes[0].axhline(100 * exact["accuracy"], color="k", ls=":", label="exact worst case")
    axes[0].set_ylabel("accuracy under attack (%)")
    axes[1].set_ylabel("examples at the exact worst loss (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("forward passes per example")
        ax.legend(fontsize=8)
    fig.suptitle("Greedy / beam vs random search at equal cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
