"""The report's files: tables as CSV and markdown, the seeds summary, JSON-safe values.

:func:`write_table` writes one table as CSV and returns it as markdown (``X`` with ``X_ci95``
shown as one ``mean ± half-width`` cell); :func:`write_seeds_summary` aggregates the headline
numbers over runs into ``seeds.{json,csv,md}``. :func:`ci_text`, :func:`float_or_nan` and
:func:`jsonable` are the value conversions the other report modules share.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis, io

__all__ = ["write_table", "ci_text", "float_or_nan", "jsonable", "write_seeds_summary"]


def write_table(
    out_dir: str, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """Writes ``rows`` to ``out_dir/name.csv`` and returns them as a markdown table.

    In the markdown, a column ``X`` followed by ``X_ci95`` (a 95 % half-width) shows as one
    ``mean ± half-width`` cell (the mean alone where the width is NaN, i.e. one run).
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    shown = [c for c in columns if not (c.endswith("_ci95") and c[:-5] in columns)]

    def cell(row, c):
        v, half = row.get(c), row.get(f"{c}_ci95")
        if f"{c}_ci95" in columns and isinstance(half, float) and math.isfinite(half):
            return f"{_md_value(v)} ± {_md_value(half)}"
        return _md_value(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, c) for c in shown) + " |")
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return "" if v is None else v


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.2f}"
    if isinstance(v, list | tuple):
        return "/".join(str(x) for x in v)
    return "" if v is None else str(v)


def ci_text(s: Mapping[str, float], digits: int = 2) -> str:
    """``"mean ± half-width"`` of an :func:`analysis.mean_ci` result (the mean alone if n < 2)."""
    if s["n"] >= 2 and math.isfinite(s["half_width"]):
        return f"{s['mean']:.{digits}f} ± {s['half_width']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def float_or_nan(v: Any) -> float:
    """``v`` as a float, with None (how :func:`jsonable` writes a NaN) back to NaN."""
    return math.nan if v is None else float(v)


def write_seeds_summary(
    results_by_run: Mapping[str, Mapping[str, Any]], out_dir: str, confidence: float = 0.95
) -> dict[str, Any]:
    """Aggregates headline numbers over runs into ``seeds.json``, ``seeds.csv``, ``seeds.md``.

    Returns:
      :func:`analysis.aggregate_seeds` of the runs, plus ``markdown`` (the table).
    """
    agg = analysis.aggregate_seeds(results_by_run, confidence)
    runs = agg["seeds"]
    rows = []
    for name, m in agg["metrics"].items():
        rows.append(
            {
                "metric": name,
                "unit": m["unit"],
                "n": m["n"],
                "mean": m["mean"],
                "ci95_half_width": m["half_width"],
                "ci95_low": m["low"],
                "ci95_high": m["high"],
                "std": m["std"],
                **{r: m["values"][r] for r in runs},
                "mean ± 95% CI": ci_text(m),
            }
        )
    os.makedirs(out_dir, exist_ok=True)
    table = write_table(
        out_dir,
        "seeds",
        rows,
        ["metric", "unit", "n", "mean", "ci95_half_width", "ci95_low", "ci95_high", "std", *runs],
    )
    md = write_table(out_dir, "seeds_display", rows, ["metric", "unit", "mean ± 95% CI", *runs])
    os.remove(os.path.join(out_dir, "seeds_display.csv"))  # seeds.csv holds the numbers
    io.write_json_atomic(os.path.join(out_dir, "seeds.json"), jsonable(agg))
    header = (
        f"Headline numbers over {len(runs)} run(s) ({', '.join(runs)}): mean ± "
        f"{confidence:.0%} Student-t interval (n - 1 dof)."
    )
    io.write_text_atomic(os.path.join(out_dir, "seeds.md"), f"{header}\n\n{md}\n")
    del table
    return {**agg, "markdown": md}


def jsonable(x: Any) -> Any:
    """A copy of ``x`` that :func:`json.dumps` takes: numpy arrays and scalars as lists and
    Python numbers, dict keys as strings, tuples as lists, NaN and infinities as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN
    return x
