"""Shared helpers of the benchmark suite: timing, hardware description, model set-up, tables.

Every ``bench_*.py`` next to this file exposes ``run(quick: bool = False) -> dict`` with keys
``name``, ``goal`` (text), ``metric`` (what ``ratio`` measures), ``ratio`` (float or None),
``met`` (bool or None: None when the goal does not apply, e.g. a skipped optional bench),
``rows`` (list of flat dicts, one table) and optionally ``plots`` (PNG paths) and ``notes``
(list of strings). ``experiments/run_benchmarks.py`` discovers and runs them all.

Timing: :func:`time_fn` calls the function a few times to warm up (compile, caches), then
reports the median wall time of ``repeats`` calls, each ending with ``jax.block_until_ready``
on the result, so asynchronous dispatch is included in the time it belongs to.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ptq_adversary import models  # noqa: E402

__all__ = [
    "REPO",
    "time_fn",
    "time_interleaved",
    "hardware",
    "load_note",
    "cpu_times",
    "other_load",
    "make_cnn",
    "random_bits",
    "markdown_table",
    "cpu_count",
]


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def time_fn(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_repeats: int = 1,
    budget_s: float | None = None,
) -> dict[str, float]:  # fmt: skip
    """Median wall time of ``fn()`` after warm-up, blocking on its result each call.

    Args:
      fn: a no-argument callable returning JAX arrays (or anything ``block_until_ready``
        accepts); its first call may compile.
      warmup: calls before timing (the first one includes compilation).
      repeats: timed calls.
      min_repeats: with ``budget_s``, at least this many timed calls.
      budget_s: stop timing once this many seconds were spent (after ``min_repeats``); bounds
        the slow configurations without fixing the repeat count for the fast ones.

    Returns:
      ``{"median_s", "min_s", "max_s", "repeats", "first_s"}`` (``first_s``: the first warm-up
      call, compile included; 0 when ``warmup == 0``).
    """
    first = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        if i == 0:
            first = time.perf_counter() - t0
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        if budget_s is not None and len(times) >= min_repeats:
            if time.perf_counter() - start > budget_s:
                break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "first_s": first,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 1,
    budget_s: float | None = None, min_rounds: int = 2, calls: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median wall times of several functions timed round-robin, one call each per round.

    Interleaving spreads changes in background load over all candidates alike, so their
    ratios stay meaningful on a shared machine even when absolute times drift.

    Args:
      fns: name -> no-argument callable returning JAX arrays.
      rounds: timed rounds (each calls every function once).
      warmup: untimed rounds first.
      budget_s: stop after the round in which this many seconds were spent in total (at least
        ``min_rounds`` rounds).
      min_rounds: see ``budget_s``.
      calls: name -> timed calls per round (default 1), for cheap functions measured next to
        expensive ones (more samples at little cost).

    Returns:
      name -> ``{"median_s", "min_s", "max_s", "repeats"}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range((calls or {}).get(name, 1)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r + 1 >= min_rounds:
            if time.perf_counter() - start > budget_s:
                break
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "repeats": len(t),
        }  # fmt: skip
        for name, t in times.items()
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, jax version and backend, load."""
    devices = jax.devices()
    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def hardware_line(hw: dict[str, Any] | None = None) -> str:
    """One-line description, e.g. ``AMD EPYC, 2 cores, x86_64, jax 0.10.2 (cpu)``."""
    hw = hw or hardware()
    return (
        f"{hw['cpu']}, {hw['cores']} cores, {hw['machine']}, jax {hw['jax']} "
        f"({hw['backend']}: {', '.join(sorted(set(hw['devices'])))}), Python {hw['python']}"
    )


def cpu_times() -> tuple[float, float | None, float]:
    """``(wall s, CPU s busy on the whole machine, CPU s of this process and its children)``.

    The machine-wide figure comes from ``/proc/stat`` (user, nice, system, irq, softirq; not
    steal) and is None where that file does not exist.
    """
    busy = None
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf(
            "SC_CLK_TCK"
        )
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return time.perf_counter(), busy, own


def other_load(start: tuple, end: tuple) -> float | None:
    """Cores used on average by OTHER processes between two :func:`cpu_times` snapshots.

    Unlike the load average, this does not count the benchmark's own threads.
    """
    (w0, b0, o0), (w1, b1, o1) = start, end
    if b0 is None or b1 is None or w1 <= w0:
        return None
    return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


_IMPORTED = cpu_times()


def load_note(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when other processes used more than a quarter of a core on average.

    Args:
      load: from :func:`other_load`; None measures since this module was imported.
      cores: the machine's cores (default :func:`cpu_count`).
    """
    cores = cores or cpu_count()
    if load is None:
        load = other_load(_IMPORTED, cpu_times())
    if load is not None and load > 0.25:
        return (
            f"other processes used {load:.2f} of the {cores} cores on average while this ran: "
            "absolute times are inflated and ratios noisy"
        )
    return None


def make_cnn(
    *, in_channels: int = 1, image_size: int = 28, seed: int = 0, name: str = "cnn", **kwargs
):
    """The default student (``models.create_model('cnn', ...)`` as configs/fmnist_pair.py).

    ``image_size`` is that of the inputs the benches feed (28x28, Fashion-MNIST): the model's
    sites and segment cuts are derived for it.

    Returns:
      ``(model, graphdef, params, rest)``.
    """
    model = models.create_model(
        name, num_classes=10, in_channels=in_channels, image_size=image_size, weight_bits=8,
        rngs=nnx.Rngs(seed), **kwargs,
    )  # fmt: skip
    graphdef, params, rest = models.split_model(model)
    return model, graphdef, params, rest


def random_bits(key: jax.Array, shape: Sequence[int], choices=(2, 3, 4, 5, 6, 8)) -> jax.Array:
    """int32 bit-widths of ``shape`` drawn uniformly from ``choices`` (not budget-constrained)."""
    idx = jax.random.randint(key, tuple(shape), 0, len(choices))
    return jnp.asarray(choices, jnp.int32)[idx]


def format_cell(v: Any) -> str:
    """A table cell: yes/no/- for booleans and None, floats to 3 significant digits."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (columns: the union of keys in first-seen order)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def print_result(result: dict[str, Any]) -> None:
    """Prints a bench's result dict as a small report (the ``__main__`` of every bench)."""
    print(f"# {result['name']}")
    print(hardware_line())
    print(f"goal: {result['goal']}")
    ratio = result.get("ratio")
    met = format_cell(result.get("met"))
    print(f"{result.get('metric', 'ratio')}: {format_cell(ratio)}  met: {met}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(markdown_table(result["rows"]))
    for key, value in result.items():
        if key != "rows" and isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key}:")
            print(markdown_table(value))
    for p in result.get("plots", []):
        print(f"plot: {p}")


def call_run(run: Callable[..., dict[str, Any]], *, quick: bool, plot_dir: str | None):
    """Calls a bench's ``run``, passing ``plot_dir`` only to benches that take it."""
    kwargs: dict[str, Any] = {"quick": quick}
    if plot_dir is not None and "plot_dir" in inspect.signature(run).parameters:
        kwargs["plot_dir"] = plot_dir
    start = cpu_times()
    result = run(**kwargs)
    load = other_load(start, cpu_times())
    result.setdefault("hardware", hardware())
    result["other_load_cores"] = load
    note = load_note(load)
    notes = result.setdefault("notes", [])
    if note and not any(n.startswith("other processes used") for n in notes):
        notes.append(note)
    return result


def main(run: Callable[..., dict[str, Any]]) -> None:
    """``python bench_x.py [--quick] [--json PATH] [--plot-dir DIR]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, a sanity pass")
    parser.add_argument("--json", default=None, help="also write the result dict here")
    parser.add_argument("--plot-dir", default=None, help="where plots go (benches that plot)")
    args = parser.parse_args()
    result = call_run(run, quick=args.quick, plot_dir=args.plot_dir)
    print_result(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=float)
