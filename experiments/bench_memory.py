"""Peak memory vs the number of policies P: chunked evaluation stays flat beyond the chunk.

For the default student (``cnn``) on a batch of 128, the jitted P-policy evaluation (per
allocation: quantized forward and masked sums, as ``steps.make_eval_step``) is compiled for
each P, full ``vmap`` vs the library default (``steps.map_policies``, chunked ``lax.map``).
Reported: XLA's own accounting of the compiled program (``memory_analysis()``: temporary
buffers, i.e. activations; arguments, i.e. weights, images and the ``[P, B, L]`` bits; and
outputs), and, in the full run, the peak resident set size of a fresh process that compiles
and runs one evaluation.

  python experiments/bench_memory.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import optax

from ptq_adversary import backend, models, steps

NAME = "memory vs P"
GOAL = "activation memory of chunked evaluation flat in P beyond the chunk (<= 1.1x)"
BATCH = 128


def _evaluator(graphdef, chunk):
    def fn(params, rest, images, labels, bits_pbl):
        def per_policy(bits_bl):
            logits = models.apply_model(graphdef, params, rest, images, bits_bl)[0]
            correct = jnp.sum(jnp.argmax(logits, -1) == labels)
            return correct, jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        return steps.map_policies(per_policy, bits_pbl, chunk=chunk)

    return fn


def _inputs(num_policies, num_sites):
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (BATCH, 28, 28, 1))
    labels = jax.random.randint(key, (BATCH,), 0, 10)
    bits = bench_lib.random_bits(key, (num_policies, BATCH, num_sites))
    return images, labels, bits


def _rss_child(num_policies: int, mode: str) -> None:
    """In a fresh process: compile and run one evaluation, print the peak RSS (MiB)."""
    import resource

    model, graphdef, params, rest = bench_lib.make_cnn()
    images, labels, bits = _inputs(num_policies, model.num_sites)
    chunk = num_policies if mode == "vmap" else None
    fn = jax.jit(_evaluator(graphdef, chunk))
    jax.block_until_ready(fn(params, rest, images, labels, bits))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_mib": peak_kib / 1024}))


def _rss(num_policies: int, mode: str) -> float | None:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(num_policies), mode],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["rss_mib"]
    return None


def run(quick: bool = False) -> dict[str, Any]:
    """Compiled memory per P and mode; ratio = activation temp at P max / at the first loop P.

    The loop of the chunked evaluation keeps a copy of its ``[P, B, L]`` int32 bits input in
    its loop state (an XLA while loop does not alias a non-donated argument), so its temporary
    memory grows by exactly ``4 B L`` bytes per policy; the "activations" column subtracts
    that copy. Both are reported.
    """
    policies = (1, 8, 64) if quick else (1, 8, 64, 1024)
    model, graphdef, params, rest = bench_lib.make_cnn()
    rows = []
    temp: dict[tuple[str, int], float] = {}
    mib = 1 / 2**20
    for num_policies in policies:
        images, labels, bits = _inputs(num_policies, model.num_sites)
        auto = f"auto (chunk {backend.policy_chunk(num_policies, BATCH)})"
        for mode, c in (("vmap", num_policies), (auto, None)):
            fn = jax.jit(_evaluator(graphdef, c))
            stats = fn.lower(params, rest, images, labels, bits).compile().memory_analysis()
            looped = mode != "vmap" and backend.policy_chunk(num_policies, BATCH) < num_policies
            activations = stats.temp_size_in_bytes - (bits.nbytes if looped else 0)
            temp[(mode.split()[0], num_policies)] = activations
            rows.append({
                "P": num_policies, "mode": mode, "temp MiB": stats.temp_size_in_bytes * mib,
                "activations MiB": activations * mib, "bits MiB": bits.nbytes * mib,
                "arguments MiB": stats.argument_size_in_bytes * mib,
            })  # fmt: skip
    notes = []
    if not quick:  # peak RSS of fresh processes (jax + model + one evaluation)
        for num_policies, mode in ((64, "vmap"), (8, "auto"), (64, "auto")):
            rss = _rss(num_policies, mode)
            for row in rows:
                if row["P"] == num_policies and row["mode"].startswith(mode):
                    row["process peak RSS MiB"] = rss
        notes.append("process peak RSS includes ~0.4-0.5 GiB for Python, jax and XLA itself")
    chunk = backend.policy_chunk(max(policies), BATCH)
    flat_from = min(p for p in policies if p > chunk)
    ratio = temp[("auto", max(policies))] / max(temp[("auto", flat_from)], 1)
    vmap_ratio = temp[("vmap", max(policies))] / max(temp[("vmap", flat_from)], 1)
    notes.append(
        f"batch {BATCH}; default chunk {chunk} polic{'y' if chunk == 1 else 'ies'}; activation "
        f"temp(P={max(policies)}) / temp(P={flat_from}): default {ratio:.3f}, vmap "
        f"{vmap_ratio:.1f}"
    )
    return {"name": NAME, "goal": GOAL,
            "metric": "activation temp, P max / first chunked P (default mode)",
            "ratio": ratio, "met": ratio <= 1.1, "rows": rows, "notes": notes}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-child":
        _rss_child(int(sys.argv[2]), sys.argv[3])
    else:
        bench_lib.main(run)
