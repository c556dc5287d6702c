r"""Integer execution vs fake quantization: does the collapse hold on integer arithmetic?

  python experiments/integer_fidelity.py --pipeline=runs/seeds/seed_0 \
      [--out=experiments/results/integer_fidelity]

For the robust and the detrimental pair of a pipeline workdir, on the whole test split, this
evaluates each network three ways at the pair's own greedy allocation and at the uniform
allocation: full precision, fake quantization (float simulation, what training and every other
evaluation use) and integer execution (``quant_mode="integer"``: every site on integer codes with
int32 accumulation, then one rescale; ``ptq_adversary.transform``). It reports the accuracy of
each, the prediction agreement of integer vs fake, and the largest logit difference, as
``integer_fidelity.{json,md}``. Runtime: about a minute per pair on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_lib  # noqa: E402

from ptq_adversary import analysis, data, models, policy  # noqa: E402

BATCH = 500


@functools.partial(jax.jit, static_argnames=("graphdef", "policy_graphdef", "budget"))
def _three_ways(params, rest, pol_params, pol_rest, images, *, graphdef, policy_graphdef, budget):
    idx = policy.greedy_allocation(policy_graphdef, pol_params, pol_rest, images=images,
                                   budget=budget)  # fmt: skip
    own = policy.to_bits(idx, budget)
    uniform = jnp.broadcast_to(policy.to_bits(policy.uniform_allocation(budget), budget), own.shape)
    fp = models.apply_model(graphdef, params, rest, images)[0]
    out = {"fp": fp}
    for name, bits in (("own", own), ("uniform", uniform)):
        for mode in ("fake", "integer"):
            logits = models.apply_model(graphdef, params, rest, images, bits, quant_mode=mode)[0]
            out[f"{name}_{mode}"] = logits
    return out


def evaluate(run_dir: str, mode: str, dataset) -> dict:
    model, pol = analysis.load_pair(run_dir, mode)
    images = data.normalize(dataset.test.images, dataset.mean, dataset.std)
    labels = dataset.test.labels
    parts: dict[str, list[np.ndarray]] = {}
    for start, stop, pad in data.padded_batches(len(images), BATCH):
        x = data.pad_rows(images[start:stop], pad)
        out = _three_ways(
            model.params, model.rest, pol.params, pol.rest, jnp.asarray(x),
            graphdef=model.graphdef, policy_graphdef=pol.graphdef, budget=pol.spec.budget_spec,
        )  # fmt: skip
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[: stop - start])
    logits = {k: np.concatenate(v) for k, v in parts.items()}
    acc = {k: float((v.argmax(-1) == labels).mean()) for k, v in logits.items()}
    row = {"mode": mode, "num_examples": int(len(labels)), "accuracy": acc}
    for alloc in ("own", "uniform"):
        fake, integer = logits[f"{alloc}_fake"], logits[f"{alloc}_integer"]
        row[f"{alloc}_agreement"] = float((fake.argmax(-1) == integer.argmax(-1)).mean())
        row[f"{alloc}_max_logit_diff"] = float(np.abs(fake - integer).max())
        row[f"{alloc}_max_abs_logit"] = float(np.abs(fake).max())
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Integer execution vs fake quantization",
        "",
        f"`{meta['command']}` on {meta['cpu']}, jax {meta['jax']}; {meta['seconds']:.0f} s.",
        "",
        "| pair | allocation | FP acc | fake-quant acc | integer acc | drop (integer) | "
        "agreement int vs fake | max \\|logit diff\\| (max \\|logit\\|) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["accuracy"]
        for alloc, label in (("own", "own policy (greedy)"), ("uniform", "uniform")):
            lines.append(
                f"| {r['mode']} | {label} | {100 * a['fp']:.2f}% | {100 * a[alloc + '_fake']:.2f}%"
                f" | {100 * a[alloc + '_integer']:.2f}% | "
                f"{100 * (a['fp'] - a[alloc + '_integer']):.2f} pts | "
                f"{100 * r[alloc + '_agreement']:.2f}% | {r[alloc + '_max_logit_diff']:.2e} "
                f"({r[alloc + '_max_abs_logit']:.1f}) |"
            )
    lines.append("")
    lines.append(f"{rows[0]['num_examples']} test images per pair.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline workdir")
    parser.add_argument("--out", default=str(REPO / "experiments/results/integer_fidelity"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    dataset = analysis.load_run_dataset(args.pipeline)
    rows = [evaluate(args.pipeline, mode, dataset) for mode in ("robust", "detrimental")]
    meta = {
        "command": f"python experiments/integer_fidelity.py --pipeline={args.pipeline}",
        "cpu": bench_lib.cpu_model(),
        "jax": jax.__version__,
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "integer_fidelity.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "integer_fidelity.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
