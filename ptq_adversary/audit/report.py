"""The audit's report: :func:`write_report` writes an :class:`~ptq_adversary.audit.AuditResult`
as ``audit.json``, ``methods.csv``, ``examples.csv``, a markdown summary
(:func:`summary_markdown`) and the PNG plots of :mod:`ptq_adversary.audit.plots`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ptq_adversary import io
from ptq_adversary.audit import plots
from ptq_adversary.audit.results import METHOD_LABELS, AuditResult, example_status, status_codes

__all__ = ["summary_markdown", "write_report"]


def write_report(
    result: AuditResult, out_dir: str, *, title: str = "DPTQ audit", top: int = 20
) -> dict[str, str]:
    """Writes an audit as ``audit.json``, ``methods.csv``, ``examples.csv``, ``summary.md`` and
    PNG plots into ``out_dir`` (each file written atomically).

    Args:
      result: from :func:`~ptq_adversary.audit.audit`.
      out_dir: created if missing.
      title: the markdown heading.
      top: how many of the most vulnerable examples the summary lists (only vulnerable
        ones: correct in FP and broken by some method).

    ``examples.csv`` has a row for every example, in index order; its ``status`` column is
    ``vulnerable``, ``robust`` or ``wrong_in_fp`` (:func:`example_status`) and ``rank`` its
    place in :meth:`AuditResult.ranking`. The ``bits_*`` columns are the breaking allocation
    of a vulnerable example; for the others, which nothing found breaks, the allocation of the
    highest quantized loss found.

    Returns:
      ``{kind: path}`` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (
            ("json", "audit.json"),
            ("methods_csv", "methods.csv"),
            ("examples_csv", "examples.csv"),
            ("markdown", "summary.md"),
            ("accuracy_png", "accuracy_by_method.png"),
            ("margin_png", "vulnerability_vs_margin.png"),
            ("bits_png", "breaking_bits.png"),
        )
    }
    summary = result.summary()
    io.write_json_atomic(paths["json"], summary)

    rows = ["method,accuracy,drop_points,flip_rate,evaluations_per_example,seconds"]
    for name, m in summary["methods"].items():
        rows.append(
            f"{name},{m['accuracy']:.6f},{m['drop_points']:.4f},{m['flip_rate']:.6f},"
            f"{m['evaluations_per_example']},{m['seconds']}"
        )
    io.write_text_atomic(paths["methods_csv"], "\n".join(rows) + "\n")

    site_cols = ",".join(f"bits_{s}" for s in result.site_names)
    rows = [
        f"index,rank,status,label,fp_correct,fp_margin,fp_loss,loss_increase,vulnerable,"
        f"min_low_bit_sites,{site_cols}"
    ]
    rank = np.empty(result.num_examples, np.int64)
    rank[result.ranking()] = np.arange(result.num_examples)
    status = example_status(result)
    for i in range(result.num_examples):
        bits = ",".join(str(int(b)) for b in result.breaking_bits[i])
        rows.append(
            f"{i},{rank[i]},{status[i]},{int(result.labels[i])},{int(result.fp_correct[i])},"
            f"{result.fp_margin[i]:.5f},{result.fp_loss[i]:.5f},"
            f"{result.loss_increase[i]:.5f},{int(status[i] == 'vulnerable')},"
            f"{int(result.min_low_bit_sites[i])},{bits}"
        )
    io.write_text_atomic(paths["examples_csv"], "\n".join(rows) + "\n")

    io.write_text_atomic(paths["markdown"], summary_markdown(result, summary, title, top))
    plots.save_plots(result, paths)
    return paths


def summary_markdown(result: AuditResult, summary: dict[str, Any], title: str, top: int) -> str:
    """The text of ``summary.md``: the methods' table, the certified bracket, notes and skipped
    methods, the share of vulnerable examples, and the ``top`` most vulnerable ones.

    Args:
      result: the audit; summary: its :meth:`~ptq_adversary.audit.AuditResult.summary`.
      title: the heading; top: most vulnerable examples listed (only vulnerable ones).
    """
    fp = summary["fp_accuracy"]
    lines = [
        f"# {title}",
        "",
        f"{result.num_examples} examples; sites {', '.join(result.site_names)}; activation "
        f"bit choices {list(result.choices)} at a mean budget of {result.budget:g} bits "
        f"({result.num_allocations} feasible allocations). Full precision: {fp:.2%}.",
        "",
        "| method | accuracy | drop (pts) | FP-correct flipped | evaluations / example | "
        "time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        acc = f"{m['accuracy']:.2%}"
        if "certified_accuracy" in m:  # a bracket: [proved, found]
            acc = f"[{m['certified_accuracy']:.2%}, {m['accuracy']:.2%}]"
        lines.append(
            f"| {METHOD_LABELS.get(name, name)} | {acc} | "
            f"{m['drop_points']:.2f} | {m['flip_rate']:.2%} | "
            f"{m['evaluations_per_example']} | {m['seconds']:.1f} |"
        )
    lines.append("")
    if "certify" in summary["methods"]:
        c = summary["methods"]["certify"]
        width = 100 * (c["accuracy"] - c["certified_accuracy"])
        lines += [
            f"Certified worst-case accuracy in [{c['certified_accuracy']:.2%}, "
            f"{c['accuracy']:.2%}] (width {width:.2f} points; "
            + ("exact" if c["exact"] else f"not closed: {c['stopped']}")
            + f"): {c['states']['certified']} examples proved correct under every feasible "
            f"allocation, {c['states']['broken']} broken, {c['states']['unknown']} unknown; "
            f"{c['nodes']} nodes evaluated, {c['bound_calls']} bounded, {c['pruned']} pruned, "
            f"{c['leaves']} full allocations.",
            "",
        ]
    if summary["random_accuracy"] is not None:
        lines.append(
            f"One random feasible allocation per example: {summary['random_accuracy']:.2%}"
            " accuracy (expected over the draws)."
        )
    if result.worst_static is not None:
        lines.append(
            f"Worst single allocation for all examples: bits {result.worst_static['bits']}"
            f" -> {result.worst_static['accuracy']:.2%}."
        )
    for name, why in result.skipped.items():
        lines.append(f"Skipped `{name}`: {why}.")
    for name, why in result.notes.items():
        lines.append(f"`{name}`: {why}.")
    status = status_codes(result)
    n_vul, n_right = int((status == 0).sum()), int((status < 2).sum())
    lines += [
        "",
        f"Vulnerable (FP-correct, broken by some allocation found): {n_vul / len(status):.2%} "
        f"of examples ({n_vul} of the {n_right} correct in FP); mean loss increase "
        f"{result.loss_increase.mean():.3f} nats.",
    ]
    known = result.min_low_bit_sites >= 0
    if known.any():
        counts = np.bincount(result.min_low_bit_sites[known], minlength=len(result.site_names) + 1)
        parts = ", ".join(f"{k}: {c}" for k, c in enumerate(counts) if c)
        lines.append(
            f"Fewest sites below the budget that break a vulnerable example "
            f"(count of examples): {parts}."
        )
    shown = result.ranking()[: min(max(top, 0), n_vul)]  # the ranking starts with them
    if len(shown) == 0:
        lines += [
            "",
            "## The most vulnerable examples",
            "",
            "No vulnerable examples: no allocation found misclassifies an example that is "
            "correct in full precision.",
        ]
    else:
        heading = (
            f"The {len(shown)} most vulnerable examples"
            if len(shown) > 1
            else "The most vulnerable example"
        )
        more = f" (of {n_vul} vulnerable)" if len(shown) < n_vul else ""
        lines += [
            "",
            f"## {heading}{more}",
            "",
            f"| index | label | FP margin | loss increase | breaking bits "
            f"({', '.join(result.site_names)}) |",
            "|---:|---:|---:|---:|---|",
        ]
    for i in shown:
        lines.append(
            f"| {i} | {result.labels[i]} | {result.fp_margin[i]:.2f} | "
            f"{result.loss_increase[i]:.2f} | {result.breaking_bits[i].tolist()} |"
        )
    lines += [
        "",
        "Files: `audit.json`, `methods.csv`, `examples.csv` (every example, with its status),",
        "`accuracy_by_method.png`, `vulnerability_vs_margin.png`, `breaking_bits.png`.",
        "",
    ]
    return "\n".join(lines)
