"""Runs every ``experiments/bench_*.py`` and writes one markdown report, JSON and plots.

  python experiments/run_benchmarks.py --out experiments/results/benchmarks [--quick]
      [--only policies static ...]

Each bench runs in its own fresh process (so compile caches, memory peaks and thread pools
of one do not leak into the next) through its ``run(quick)`` function, with a time limit.
Writes ``OUT/benchmarks.md`` (hardware, command, a summary table of the goals, then one
section per bench with its table, notes and plots), ``OUT/benchmarks.json`` (everything) and
the benches' PNGs. A bench that fails or times out is reported as such; the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_lib  # noqa: E402

SKIP = {"bench_lib.py"}


def discover() -> list[pathlib.Path]:
    """``bench_*.py`` files next to this script, in name order."""
    return sorted(p for p in HERE.glob("bench_*.py") if p.name not in SKIP)


def _child(path: str, quick: bool, plot_dir: str, json_path: str) -> None:
    """In the bench's own process: import it by path, run it, write its result as JSON."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(pathlib.Path(path).parent))
    spec.loader.exec_module(module)
    result = bench_lib.call_run(module.run, quick=quick, plot_dir=plot_dir)
    bench_lib.print_result(result)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=float)


def run_one(path: pathlib.Path, *, quick: bool, out: str, timeout_s: float) -> dict[str, Any]:
    """Runs one bench in a subprocess; returns its result dict (or an error entry)."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--child", str(path), "--out", out, "--json", json_path]
        if quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            error = None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-20:]
        except subprocess.TimeoutExpired:
            proc, error = None, [f"timed out after {timeout_s:.0f} s"]
        wall = time.perf_counter() - t0
        if error is None and os.path.exists(json_path):
            with open(json_path, encoding="utf-8") as f:
                result = json.load(f)
        else:
            result = {"name": path.stem, "goal": "-", "ratio": None, "met": None,
                      "rows": [{"error": " | ".join(error or ["no result written"])}]}  # fmt: skip
    result["file"] = path.name
    result["wall_s"] = wall
    # Plot paths relative to the report (no machine paths in the written files).
    result["plots"] = [os.path.relpath(p, out) for p in result.get("plots", [])]
    return result


def _fmt_ratio(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_report(results: list[dict[str, Any]], out: str, *, quick: bool, total_s: float,
                 load: tuple[list[float], list[float]], out_arg: str,
                 hw: dict[str, Any] | None = None, date: str | None = None) -> str:  # fmt: skip
    """Writes ``benchmarks.md`` and ``benchmarks.json`` to ``out``; returns the markdown."""
    hw = hw or bench_lib.hardware()
    date = date or datetime.datetime.now().isoformat(timespec="seconds")
    cmd = f"python experiments/run_benchmarks.py --out {out_arg}"
    cmd += " --quick" if quick else ""
    title = "# Benchmarks"
    if quick:
        title += " (quick sanity pass: small sizes, not the reported numbers)"
    lines = [
        title,
        "",
        f"- command: `{cmd}`",
        f"- hardware: {bench_lib.hardware_line(hw)}",
        f"- date: {date}; total wall time {total_s:.0f} s",
        f"- load average (1, 5, 15 min) at start {load[0]}, at end {load[1]} (it counts the "
        "benchmarks' own threads too)",
        "- other load: cores used on average by other processes while a bench ran "
        "(`/proc/stat` busy time minus the bench's own CPU time)",
    ]
    loads = [r.get("other_load_cores") for r in results]
    if any(x is not None and x > 0.25 for x in loads):
        lines.append(
            "- **note: other processes shared the CPU** during some benches (other load > 0.25 "
            "cores): their absolute times are inflated and ratios noisy; rerun on a quiet "
            "machine for reference numbers"
        )
    lines += ["", "## Summary", "",
              "| bench | goal | metric | measured | met | wall s | other load |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
        other = r.get("other_load_cores")
        lines.append(
            f"| {r['name']} | {r.get('goal', '-')} | {r.get('metric') or '-'} | "
            f"{_fmt_ratio(r.get('ratio'))} | {met} | {r['wall_s']:.0f} | "
            f"{'-' if other is None else f'{other:.2f}'} |"
        )
    for r in results:
        lines += ["", f"## {r['name']} (`{r['file']}`)", "", f"Goal: {r.get('goal', '-')}", ""]
        for note in r.get("notes", []):
            lines.append(f"- {note}")
        lines += ["", bench_lib.markdown_table(r.get("rows", []))]
        for key, value in r.items():
            if key != "rows" and isinstance(value, list) and value and isinstance(value[0], dict):
                lines += ["", f"{key}:", "", bench_lib.markdown_table(value)]
        for plot in r.get("plots", []):
            rel = os.path.relpath(plot, out) if os.path.isabs(plot) else plot
            lines += ["", f"![{os.path.basename(plot)}]({rel})"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "benchmarks.md"), "w", encoding="utf-8") as f:
        f.write(text)
    payload = {"hardware": hw, "date": date, "quick": quick, "total_s": total_s, "load": load,
               "results": results}  # fmt: skip
    with open(os.path.join(out, "benchmarks.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="default: experiments/results/benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity pass")
    parser.add_argument("--only", nargs="*", default=None,
                        help="bench names to run, e.g. policies static")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite benchmarks.md from OUT/benchmarks.json")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is None:
        args.out = "experiments/results/benchmarks"
        out = str(HERE / "results" / "benchmarks")
    else:
        out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.child:
        _child(args.child, args.quick, out, args.json)
        return
    if args.report_only:
        with open(os.path.join(out, "benchmarks.json"), encoding="utf-8") as f:
            saved = json.load(f)
        write_report(saved["results"], out, quick=saved["quick"], total_s=saved["total_s"],
                     load=saved["load"], out_arg=args.out, hw=saved["hardware"],
                     date=saved.get("date"))  # fmt: skip
        print(f"rewrote {out}/benchmarks.md")
        return

    paths = discover()
    if args.only:
        paths = [p for p in paths if p.stem.removeprefix("bench_") in args.only]
    timeout = args.timeout or (240.0 if args.quick else 600.0)
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    results = []
    for path in paths:
        print(f"== {path.name} ...", flush=True)
        result = run_one(path, quick=args.quick, out=out, timeout_s=timeout)
        print(f"   {result['name']}: {result.get('metric')} = {_fmt_ratio(result.get('ratio'))}, "
              f"met {result.get('met')}, {result['wall_s']:.0f} s", flush=True)  # fmt: skip
        results.append(result)
    total = time.perf_counter() - t0
    load_end = [round(x, 2) for x in os.getloadavg()]
    write_report(
        results, out, quick=args.quick, total_s=total, load=(load_start, load_end), out_arg=args.out
    )
    print(f"wrote {out}/benchmarks.md and benchmarks.json ({total:.0f} s)")


if __name__ == "__main__":
    main()
