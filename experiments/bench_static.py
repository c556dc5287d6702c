"""Traced vs static bit-widths: 64 distinct allocations end to end, compilation included.

The default student (``cnn``, 4 sites) evaluates one batch under 64 distinct per-site
allocations (drawn from the choices {2,3,4,5,6,8}):

* **traced** (ours): the allocation is an int array argument of one jitted function, so one
  compile serves all 64; timed as a Python loop of 64 calls, and as one
  ``steps.map_policies`` call over all 64;
* **static** (how qwix/aqt-style static quantization configs behave): the allocation is a
  tuple of Python ints passed through ``static_argnums``, so every new allocation traces and
  compiles again.

Everything is timed from a cold start of each function (fresh ``jax.jit`` objects; the
in-memory compilation cache is cleared first). With ``budget_s`` exceeded, the static path
is measured on the first allocations only and extrapolated linearly (each allocation costs
one compile plus one run, independently); the row says how many were measured.

  python experiments/bench_static.py [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import models, steps

NAME = "traced vs static bits"
GOAL = "traced bits >= 10x faster than static bits for 64 allocations, compile included"
CHOICES = (2, 3, 4, 5, 6, 8)


def run(quick: bool = False) -> dict[str, Any]:
    """End-to-end times of both paths; ratio = static / traced (loop)."""
    num_alloc, batch, budget_s = (8, 64, 20.0) if quick else (64, 128, 45.0)
    model, graphdef, params, rest = bench_lib.make_cnn()
    num_sites = model.num_sites
    rng = np.random.default_rng(0)
    allocations: list[tuple[int, ...]] = []
    seen = set()
    while len(allocations) < num_alloc:  # distinct per-site allocations
        a = tuple(int(b) for b in rng.choice(CHOICES, size=num_sites))
        if a not in seen:
            seen.add(a)
            allocations.append(a)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, 28, 28, 1))

    def forward(params, rest, images, bits_l):
        bits_bl = jnp.broadcast_to(jnp.asarray(bits_l, jnp.int32), (images.shape[0], num_sites))
        return models.apply_model(graphdef, params, rest, images, bits_bl)[0]

    rows = []
    jax.clear_caches()
    # `_cache_size()` below is jax's own private count of a jitted function's compiled
    # specializations (jax 0.10 has no public equivalent); it is not ours to make public.
    # Traced: one jitted function, 64 calls.
    t0 = time.perf_counter()
    traced = jax.jit(forward)
    outs = [traced(params, rest, images, np.asarray(a, np.int32)) for a in allocations]
    jax.block_until_ready(outs)
    traced_s = time.perf_counter() - t0
    rows.append({"path": "traced, loop of calls", "allocations": num_alloc, "measured": num_alloc,
                 "compiles": traced._cache_size(), "total s": traced_s,
                 "s / allocation": traced_s / num_alloc})  # fmt: skip

    # Traced: all allocations in one call over the policy axis.
    jax.clear_caches()
    t0 = time.perf_counter()
    bits_pl = jnp.asarray(allocations, jnp.int32)
    many = jax.jit(
        lambda p, r, x, b: steps.map_policies(lambda bl: forward(p, r, x, bl), b[:, None, :])
    )
    jax.block_until_ready(many(params, rest, images, bits_pl))
    many_s = time.perf_counter() - t0
    rows.append({"path": "traced, one map_policies call", "allocations": num_alloc,
                 "measured": num_alloc, "compiles": 1, "total s": many_s,
                 "s / allocation": many_s / num_alloc})  # fmt: skip

    # Static: bits are Python ints, one trace and compile per allocation.
    jax.clear_caches()
    static = jax.jit(forward, static_argnums=3)
    start = time.perf_counter()
    static_outs, measured = [], 0
    for a in allocations:
        static_outs.append(jax.block_until_ready(static(params, rest, images, a)))
        measured += 1
        if time.perf_counter() - start > budget_s and measured >= 4:
            break
    elapsed = time.perf_counter() - start
    static_s = elapsed * num_alloc / measured
    rows.append({"path": "static (static_argnums), one compile each", "allocations": num_alloc,
                 "measured": measured, "compiles": static._cache_size(), "total s": static_s,
                 "s / allocation": elapsed / measured})  # fmt: skip

    # Same numbers either way (the static path constant-folds the bit-widths).
    diff = max(float(jnp.max(jnp.abs(o - s))) for o, s in zip(outs, static_outs, strict=False))
    ratio = static_s / traced_s
    notes = [f"batch {batch}; max |logit difference| traced vs static {diff:.2e}"]
    if measured < num_alloc:
        notes.append(
            f"static path measured on {measured} of {num_alloc} allocations and extrapolated "
            "linearly (time budget)"
        )
    return {"name": NAME, "goal": GOAL, "metric": "static / traced (loop) end-to-end time",
            "ratio": ratio, "met": ratio >= 10, "rows": rows, "notes": notes}  # fmt: skip


if __name__ == "__main__":
    bench_lib.main(run)
