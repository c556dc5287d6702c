"""The text of ``report.md``: the tables and figures, with prose computed from the numbers.

:func:`report_markdown` lays out the report; its summary bullets are computed from the same
pooled numbers as the tables (nothing typed in).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ptq_adversary import analysis
from ptq_adversary.report import aggregate, runs, tables

__all__ = ["report_markdown"]


def report_markdown(
    workdir: str,
    run_dirs: Mapping[str, str],
    results: Mapping[str, Any],
    assess: Mapping[str, Any],
    corr: Mapping[str, Any],
    seeds: Mapping[str, Any],
    md_tables: Mapping[str, str],
    modes: Sequence[str],
    out: str,
    *,
    layout: runs.RunLayout = runs.SEEDS_LAYOUT,
) -> str:
    """The text of ``report.md``.

    Args:
      workdir: the workdir the report is of (named in the command line it shows).
      run_dirs: run name -> pipeline workdir (:func:`~ptq_adversary.report.runs.find_runs`).
      results: run name -> ``results.json``; assess, corr: run name -> the cached
        :func:`~ptq_adversary.report.cache.assess_run` / ``corrupt_run`` results (``corr``
        empty without corruptions).
      seeds: :func:`~ptq_adversary.report.tables.write_seeds_summary` of the runs.
      md_tables: markdown table by name (:func:`~ptq_adversary.report.aggregate.pair_tables`
        and ``corruption_tables``).
      modes: the pairs every run has; out: the report directory (its files are listed).
      layout: the run layout the runs were found with (shown in the command line unless it
        is the default).
    """
    first = next(iter(results.values()))
    n = len(run_dirs)
    flags = "" if layout == runs.SEEDS_LAYOUT else f" --runs={layout.name}"
    a0 = assess[next(iter(assess))]["pairs"][modes[0]]
    lines = [
        "# DPTQ assessment report",
        "",
        f"Made by `python -m ptq_adversary.report --workdir={_rel(workdir)}{flags}` from {n} "
        f"pipeline run(s) ({', '.join(run_dirs)}): {first['dataset']}, student "
        f"`{first['student_model']}`, teacher `{first['teacher_model']}`, budget "
        f"{first['budget']:g} mean bits over {first['choices']}, test split "
        f"({a0['num_examples']} images). Across runs: mean ± 95 % Student-t interval "
        "(n - 1 dof); with one run, the value. Every table is also a CSV next to this file.",
        "",
        "## Summary (computed from the tables below)",
        "",
        *_findings(seeds, assess, corr, modes),
        "",
        "## Headline numbers",
        "",
        seeds["markdown"],
        "",
        "`drop`: FP minus DPTQ test accuracy in points, under the pair's own greedy policy; "
        "`uniform`/`random`: the same network under the uniform allocation / random feasible "
        "allocations at the same budget; `flip_rate`: inputs FP gets right and DPTQ wrong; "
        "`max_fp_gap`: largest FP accuracy gap among the student and the pairs.",
        "",
        "![accuracy drops](accuracy_drops.png)",
        "",
        "## Transitory points: which inputs flip",
        "",
        "Flip rate per decile of the FP margin (top-1 minus top-2 logit; decile 1 = smallest), "
        "in % of the inputs of the decile:",
        "",
        md_tables["flip_by_margin"],
        "",
        "![flip rate vs margin](flip_vs_margin.png)",
        "",
        "How concentrated the events are on low FP margins. `flips`: FP-right inputs that "
        "DPTQ gets wrong, among the FP-right inputs, against the true-class margin; "
        "`flips_outside_dominant`: the same without the inputs of the class DPTQ predicts "
        "most often (a collapse onto one class cannot flip that class's own inputs); "
        "`changes`: any change of the predicted class, among all inputs, against the top-1 − "
        "top-2 margin. `rate_pct`: events per eligible input; `in_lowestQ_pct`: % of the "
        "events that fall in the Q % lowest-margin eligible inputs (Q if the margin did not "
        "matter); `lift_lowest10`: event rate in the lowest decile over the overall rate; "
        "`auroc`: probability that an event input has a lower margin than a non-event one "
        "(0.5: no relation; below 0.5: events sit on *high* margins); medians in logits:",
        "",
        md_tables["concentration"],
        "",
        "Per true class (rates within the class, %; `*_predicted_share_pct`: share of all "
        "inputs predicted as the class in FP / under DPTQ):",
        "",
        md_tables["flip_by_class"],
        "",
        "## Layer-wise: which bits where, and which sites matter",
        "",
        md_tables["bit_histogram"],
        "",
        "![bit histograms](bit_histograms.png)",
        "",
        "Allocations used on the test set (`class_info_fraction`: mutual information between "
        "the true class and the allocation over the allocation's entropy; 0 = the allocation "
        "does not depend on the class):",
        "",
        md_tables["allocation"],
        "",
        "![class bits](class_bits.png)",
        "",
    ]
    if "sensitivity" in md_tables:
        lines += [
            "One-site-at-a-time sensitivity (budget ignored): one site at the lowest choice, "
            "every other site at the highest; drop in points against all sites at the highest "
            "(all choices in `sensitivity.csv`):",
            "",
            md_tables["sensitivity"],
            "",
            "![sensitivity](sensitivity.png)",
            "",
        ]
    if corr:
        c0 = corr[next(iter(corr))]
        lines += [
            "## Corruptions and transforms",
            "",
            f"Test images ({c0['num_examples']} per run) corrupted on the pixel scale, then "
            "normalised; the policy sees the corrupted image and picks its allocation for it. "
            "Mean over severities 1-5 (accuracy in %, drop in points; every severity in "
            "`corruptions.csv`):",
            "",
            md_tables["corruption_summary"],
            "",
            "![corruptions](corruptions.png)",
            "",
            "![corruption drops](corruption_drops.png)",
            "",
            "![corruption examples](corruption_examples.png)",
            "",
        ]
    lines += [
        "Files: "
        + ", ".join(sorted(f for f in os.listdir(out) if f.endswith((".csv", ".png", ".json")))),
        "",
    ]
    return "\n".join(lines)


def _findings(seeds, assess, corr, modes) -> list[str]:
    """Bullet points with the key numbers of the report (all computed, nothing typed in)."""
    m = seeds["metrics"]
    names = list(assess)
    out = []
    for mode in modes:
        out.append(
            f"- **{mode} pair**: FP {tables.ci_text(m[f'{mode}_fp_acc'])} %, DPTQ "
            f"{tables.ci_text(m[f'{mode}_dptq_acc'])} %, drop "
            f"{tables.ci_text(m[f'{mode}_drop'])} points "
            f"(uniform allocation {tables.ci_text(m[f'{mode}_uniform_drop'])}, random feasible "
            f"allocations {tables.ci_text(m[f'{mode}_random_drop'])})."
        )
    for mode in modes:
        tr = [assess[r]["pairs"][mode]["transitory"] for r in names]
        conc = [t["concentration"]["flips"] for t in tr]
        outside = [t["concentration"]["flips_outside_dominant"] for t in tr]
        ci = lambda vals, scale=100.0: tables.ci_text(
            analysis.mean_ci([scale * tables.float_or_nan(v) for v in vals])
        )
        out.append(
            f"- **{mode} flips**: {ci([c['flip_rate'] for c in conc])} % of FP-right inputs "
            f"flip; {ci([c['share_lowest_10'] for c in conc])} % of the flips lie in the "
            f"lowest FP-margin decile (AUROC of the margin "
            f"{ci([c['auroc'] for c in conc], 1.0)}); DPTQ puts "
            f"{ci([t['dominant_share'] for t in tr])} % of all inputs in one class; outside "
            f"that class {ci([c['flip_rate'] for c in outside])} % of FP-right inputs flip "
            f"(AUROC {ci([c['auroc'] for c in outside], 1.0)})."
        )
    for mode in modes:
        lw = [assess[r]["pairs"][mode]["layerwise"] for r in names]
        sites = assess[names[0]]["pairs"][mode]["site_names"]
        alloc = "; ".join(
            f"{r}: {'/'.join(map(str, w['allocation']['modal_bits']))} on "
            f"{100 * w['allocation']['modal_share']:.0f} % of inputs"
            for r, w in zip(names, lw, strict=True)
        )
        text = f"- **{mode} policy** (bits on {'/'.join(sites)}): {alloc}."
        if all(w["sensitivity"] for w in lw):
            drops = np.asarray([w["sensitivity"]["lowest_drop"] for w in lw])  # [runs, L]
            order = np.argsort(-drops.mean(0))
            low = lw[0]["sensitivity"]["lowest_bits"]
            text += (
                f" One site at {low} bits (rest at {lw[0]['sensitivity']['reference_bits']}) "
                f"costs the {mode} network "
                + ", ".join(
                    f"{sites[i]} {tables.ci_text(analysis.mean_ci(drops[:, i]))}" for i in order
                )
                + " points."
            )
        out.append(text)
    if corr:
        stats = aggregate.corruption_stats(corr)
        for mode in modes:
            keys = [k for k in stats if k[2] == mode and k[1] > 0]
            drop = {k: float(np.mean(stats[k]["drop"])) for k in keys}
            q = {k: 100 * float(np.mean(stats[k]["dptq_accuracy"])) for k in keys}
            worst = max(keys, key=lambda k: drop[k])
            best_q = max(keys, key=lambda k: q[k])
            out.append(
                f"- **{mode} under corruptions** ({len(keys)} corruption x severity settings): "
                f"DPTQ drop from {min(drop.values()):.2f} to {max(drop.values()):.2f} points "
                f"(largest: {worst[0]} severity {worst[1]}); DPTQ accuracy from "
                f"{min(q.values()):.1f} to {max(q.values()):.1f} % (highest: {best_q[0]} "
                f"severity {best_q[1]}, where FP is "
                f"{100 * float(np.mean(stats[best_q]['fp_accuracy'])):.1f} %)."
            )
    return out


def _rel(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel
