"""The audit as a command: load (or train) a model, audit it, write the report.

``configs/audit.py`` drives it::

  python -m ptq_adversary.main --config=configs/audit.py:source=student,pipeline=runs/final \\
      --workdir=runs/audit_student

Sources (``config.source.kind``): a stage of a pipeline workdir (``teacher``, ``student`` or
either pair, ``robust`` / ``detrimental``, whose selected ``best/`` network is audited) or
``fresh``: a model trained here first by the supervised trainer (``config.model`` /
``config.optim``) into ``WORKDIR/model_train``. Writes into the workdir::

    audit.json, methods.csv, examples.csv, summary.md, *.png   (audit.write_report)
    results.json                                               the summary, with the source
    brackets.json, brackets.csv, bracket_vs_budget.png         with config.audit.bracket_budgets

``config.audit.certify`` sets the ``certify`` method's ``node_limit``, ``time_limit`` and
``bounds`` (``"auto"``, ``"on"``, ``"off"``: :func:`ptq_adversary.certify.certify`'s
``bounds="auto"``, ``True``, ``False``; :data:`BOUNDS`).

Bracket sweep (``config.audit.bracket_budgets``, a list of mean budgets, empty by default):
after the main audit, every listed budget is audited again with :func:`bracket_methods` (the
configured methods but ``policy`` and ``exhaustive``, which cost a training run and an
enumeration per budget, plus ``certify``); a budget equal to the main one reuses the main audit
when that ran ``certify``. Per budget the sweep records the certified accuracy (proved lower
bound of the worst case), the found accuracy (upper bound: the lowest accuracy of any method,
which is certify's, as it tries the searches' finds first), the width of the bracket in points,
whether it is exact (no example left unknown), certify's nodes and seconds, and each search's
accuracy; summary.md gets the table as "Certified bracket vs budget". Every budget must be
feasible for the model's sites and choices (checked before anything is written).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ptq_adversary import artifacts, audit, data, io, plotting
from ptq_adversary import config as config_lib
from ptq_adversary.training import checks, loop, supervised, toolkit

__all__ = [
    "BOUNDS",
    "RULES",
    "SOURCES",
    "bracket_methods",
    "bracket_row",
    "run_audit",
    "write_brackets",
]

log = logging.getLogger(__name__)

SOURCES = ("teacher", "student", "robust", "detrimental", "fresh")

#: ``config.audit.certify.bounds`` -> :func:`ptq_adversary.certify.certify`'s ``bounds``.
BOUNDS = {"auto": "auto", "on": True, "off": False}

#: The searches a bracket sweep may run (when configured), in the order reported.
BRACKET_SEARCHES = ("uniform", "random", "greedy", "beam")


def _methods(v: Any) -> str | None:
    if not isinstance(v, list | tuple) or not v or any(m not in audit.METHODS for m in v):
        return f"must be a non-empty list of {list(audit.METHODS)}, got {v!r}"
    return None


def _budgets(v: Any) -> str | None:
    if not isinstance(v, list | tuple) or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0 < b < math.inf for b in v
    ):
        return f"must be a list of mean budgets (numbers > 0), got {v!r}"
    if len(set(v)) != len(v):
        return f"must not repeat a budget, got {list(v)!r}"
    return None


_R = config_lib.Rule
_POS_INT, _POS_FLOAT = config_lib.positive(int), config_lib.positive(float)
#: The fields an audit config must get right (then :data:`checks.NETWORK_CHECKS`; the source
#: and the budgets' feasibility are checked by :func:`run_audit`, which may load the model).
RULES = (
    *config_lib.common_rules(),
    _R("source.kind", config_lib.one_of(SOURCES)),
    _R("audit.choices", config_lib.bit_choices),
    _R("audit.budget", _POS_FLOAT),
    _R("audit.methods", _methods),
    _R("audit.num_examples", _POS_INT, optional=True),
    _R("audit.max_allocations", _POS_INT),
    _R("audit.beam_width", _POS_INT),
    _R("audit.num_moves", _POS_INT),
    _R("audit.num_iters", _POS_INT),
    _R("audit.low_starts", config_lib.boolean),
    _R("audit.num_random", _POS_INT, optional=True),
    _R("audit.example_chunk", _POS_INT),
    _R("audit.policy.steps", _POS_INT),
    _R("audit.policy.batch_size", _POS_INT),
    _R("audit.policy.learning_rate", _POS_FLOAT),
    _R("audit.policy.widths", config_lib.positive_ints),
    _R("audit.policy.train_examples", _POS_INT, optional=True),
    _R("audit.certify.node_limit", _POS_INT, optional=True),
    _R("audit.certify.time_limit", _POS_FLOAT, optional=True),
    _R("audit.certify.bounds", config_lib.one_of(BOUNDS)),
    _R("audit.bracket_budgets", _budgets),
)


def _check_source(config: ml_collections.ConfigDict) -> None:
    """Fails early (ConfigError) when the model to audit does not exist."""
    kind = config.source.kind
    if kind == "fresh":
        return
    path = _model_dir(config)
    if not artifacts.exists(path):
        raise config_lib.ConfigError(
            "source.pipeline_dir",
            f"{config.source.pipeline_dir!r} holds no {kind} model ({path} is missing): run the "
            f"pipeline there first (configs/fmnist_pair.py) or use source.kind='fresh'",
        )


def _check_budget(config: ml_collections.ConfigDict) -> None:
    """The budget and every bracket budget must be feasible for the audited model's sites
    (ConfigError otherwise): a fresh model's from shapes, a trained one's from its artifact."""
    num_sites = None  # fresh: checks.abstract_num_sites
    if config.source.kind != "fresh":
        num_sites = artifacts.load_model(_model_dir(config)).num_sites
    budgets = [("audit.budget", config.audit.budget)]
    budgets += [("audit.bracket_budgets", b) for b in config.audit.bracket_budgets]
    checks.check_budgets(config, config.audit.choices, budgets, num_sites=num_sites)


def _model_dir(config: ml_collections.ConfigDict) -> str:
    root = os.path.abspath(config.source.pipeline_dir or ".")
    sub = {"teacher": "teacher/model", "student": "student/model",
           "robust": "robust/best/model", "detrimental": "detrimental/best/model"}  # fmt: skip
    return os.path.join(root, sub[config.source.kind])


def _fresh_model(config: ml_collections.ConfigDict, workdir: str) -> str:
    sub = ml_collections.ConfigDict()
    for key in ("seed", "data", "model", "optim", "eval", "log", "ckpt"):
        sub[key] = copy.deepcopy(config[key])
    sub.trainer = "supervised"
    train_dir = os.path.join(workdir, "model_train")
    if not os.path.exists(os.path.join(train_dir, "results.json")):
        supervised.train_and_evaluate(sub, train_dir)
    return os.path.join(train_dir, "model")


def run_audit(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Audits the configured model on the test split; see the module docstring.

    Returns:
      The summary (also in ``workdir/results.json``).
    """
    config_lib.validate(config, num_devices=jax.device_count())
    _check_source(config)
    _check_budget(config)
    workdir = loop.prepare_workdir(config, workdir)
    dataset = toolkit.load_data(config)
    model_dir = _fresh_model(config, workdir) if config.source.kind == "fresh" else (
        _model_dir(config))  # fmt: skip
    loaded = artifacts.load_model(model_dir)
    model = nnx.merge(loaded.graphdef, loaded.params, loaded.rest)

    a = config.audit
    test = dataset.test
    n = len(test) if a.num_examples is None else min(a.num_examples, len(test))
    images = data.normalize(test.images[:n], dataset.mean, dataset.std)
    labels = test.labels[:n]
    rng = np.random.default_rng(config.seed)
    m = len(dataset.train) if a.policy.train_examples is None else min(
        a.policy.train_examples, len(dataset.train))  # fmt: skip
    idx = np.sort(rng.choice(len(dataset.train), m, replace=False))
    train_images = data.normalize(dataset.train.images[idx], dataset.mean, dataset.std)
    log.info("auditing %s (%s) on %d test examples of %s", config.source.kind, model_dir, n,
             dataset.name)  # fmt: skip

    def run_at(budget: float, methods: tuple[str, ...]) -> audit.AuditResult:
        return audit.audit(
            model, images, labels, choices=tuple(a.choices), budget=budget,
            methods=methods, max_allocations=a.max_allocations,
            beam_width=a.beam_width, num_moves=a.num_moves, num_iters=a.num_iters,
            low_starts=a.low_starts, num_random=a.num_random,
            policy_config=audit.PolicyConfig(
                steps=a.policy.steps, batch_size=a.policy.batch_size,
                num_samples=a.policy.num_samples, learning_rate=a.policy.learning_rate,
                entropy_coef=a.policy.entropy_coef, widths=tuple(a.policy.widths)),
            train_images=train_images, train_labels=dataset.train.labels[idx],
            seed=config.seed, example_chunk=a.example_chunk, progress=config.log.progress,
            certify_node_limit=a.certify.node_limit, certify_time_limit=a.certify.time_limit,
            certify_bounds=BOUNDS[a.certify.bounds],
        )  # fmt: skip

    result = run_at(a.budget, tuple(a.methods))
    title = (f"DPTQ audit: {config.source.kind} ({loaded.spec.name}) on {dataset.name} test, "
             f"first {n} images")  # fmt: skip
    paths = audit.write_report(result, workdir, title=title)
    summary = {"source": config.source.kind, "model_dir": model_dir,
               "model": loaded.spec.name, "dataset": dataset.name, **result.summary()}  # fmt: skip
    bracket_table = ""
    if a.bracket_budgets:
        methods = bracket_methods(a.methods)
        rows = []
        for budget in sorted(float(b) for b in a.bracket_budgets):
            if budget == result.budget and "certify" in result.methods:
                found = result  # the main audit at this budget: reused
            else:
                log.info("bracket: budget %g, methods %s", budget, ", ".join(methods))
                found = run_at(budget, methods)
            rows.append(bracket_row(found))
        bracket_table = write_brackets(rows, workdir, methods=methods)
        summary["brackets"] = rows
        with open(paths["markdown"], encoding="utf-8") as f:
            markdown = f.read()
        io.write_text_atomic(paths["markdown"], markdown.rstrip("\n") + "\n\n"
                                  + bracket_table)  # fmt: skip
    io.write_json_atomic(os.path.join(workdir, "results.json"), summary)
    with open(paths["markdown"], encoding="utf-8") as f:
        print("\n" + f.read().split("\n## ")[0], flush=True)
    if bracket_table:
        print(bracket_table, flush=True)
    return summary


# --------------------------------------------------------------------- bracket sweep
_SEARCH_LABELS = {"uniform": "uniform", "random_search": "random search",
                  "greedy": "greedy", "beam": "beam"}  # fmt: skip


def bracket_methods(methods: Any) -> tuple[str, ...]:
    """The methods a bracket sweep runs per budget: the configured ones among
    :data:`BRACKET_SEARCHES` (no ``policy``: a training run per budget; no ``exhaustive``: an
    enumeration, which certify replaces), then ``certify``."""
    return (*(m for m in BRACKET_SEARCHES if m in methods), "certify")


def bracket_row(result: audit.AuditResult) -> dict[str, Any]:
    """One budget's bracket from an audit that ran ``certify``.

    ``accuracy`` is the found upper bound: the lowest accuracy of any method (certify's, which
    tries the other methods' finds first, unless a method found more); ``certified_accuracy``
    the proved lower bound; ``width_points`` their gap in points; ``searches`` the accuracy
    of each of :data:`BRACKET_SEARCHES` run (``random_search`` for ``random``).
    """
    s = result.summary()
    c = s["methods"]["certify"]
    found = min(m["accuracy"] for m in s["methods"].values())
    searches = {k: m["accuracy"] for k, m in s["methods"].items() if k in _SEARCH_LABELS}
    return {
        "budget": s["budget"],
        "num_allocations": s["num_allocations"],
        "fp_accuracy": s["fp_accuracy"],
        "certified_accuracy": c["certified_accuracy"],
        "accuracy": found,
        "width_points": round(100.0 * (found - c["certified_accuracy"]), 4),
        "exact": bool(c["exact"] or found == c["certified_accuracy"]),
        "unknown": c["states"]["unknown"],
        "nodes": c["nodes"],
        "seconds": c["seconds"],
        "stopped": c["stopped"],
        "searches": searches,
    }


def write_brackets(rows: list[dict[str, Any]], workdir: str, *, methods: Any = ()) -> str:
    """Writes ``brackets.json``, ``brackets.csv`` and ``bracket_vs_budget.png`` (rows of
    :func:`bracket_row`, by budget) into ``workdir``; returns the markdown table."""
    searches = [k for k in _SEARCH_LABELS if any(k in r["searches"] for r in rows)]
    io.write_json_atomic(
        os.path.join(workdir, "brackets.json"), {"methods": list(methods), "rows": rows}
    )
    head = ["budget", "num_allocations", "fp_accuracy", "certified_accuracy", "accuracy",
            "width_points", "exact", "unknown", "nodes", "seconds"]  # fmt: skip
    lines = [",".join(head + [f"{k}_accuracy" for k in searches])]
    for r in rows:
        cells = [f"{r['budget']:g}", str(r["num_allocations"]), f"{r['fp_accuracy']:.6f}",
                 f"{r['certified_accuracy']:.6f}", f"{r['accuracy']:.6f}",
                 f"{r['width_points']:.4f}", str(int(r["exact"])), str(r["unknown"]),
                 str(r["nodes"]), f"{r['seconds']}"]  # fmt: skip
        cells += [f"{r['searches'][k]:.6f}" if k in r["searches"] else "" for k in searches]
        lines.append(",".join(cells))
    io.write_text_atomic(os.path.join(workdir, "brackets.csv"), "\n".join(lines) + "\n")
    _bracket_figure(rows, searches, os.path.join(workdir, "bracket_vs_budget.png"))

    table = [
        "## Certified bracket vs budget",
        "",
        "Worst-case accuracy under DPTQ per mean budget: certified (proved: no feasible "
        "allocation breaks these examples) and found (some allocation breaks the rest), with "
        f"methods {', '.join(methods)}.",
        "",
        "| budget (bits) | allocations | certified | found | width (pts) | exact | nodes | "
        "time (s) | " + " | ".join(_SEARCH_LABELS[k] for k in searches) + " |",
        "|" + "---:|" * (8 + len(searches)),
    ]
    for r in rows:
        exact = "yes" if r["exact"] else f"no ({r['unknown']} unknown: {r['stopped']})"
        accs = " | ".join(f"{r['searches'][k]:.2%}" if k in r["searches"] else "" for k in searches)
        table.append(
            f"| {r['budget']:g} | {r['num_allocations']} | {r['certified_accuracy']:.2%} | "
            f"{r['accuracy']:.2%} | {r['width_points']:.2f} | {exact} | {r['nodes']} | "
            f"{r['seconds']:.1f} | {accs} |"
        )
    table += ["", "Files: `brackets.json`, `brackets.csv`, `bracket_vs_budget.png`.", ""]
    return "\n".join(table)


def _bracket_figure(rows: list[dict[str, Any]], searches: list[str], path: str) -> None:
    """Accuracy vs budget: the certified-to-found band, each search's accuracy, FP dashed."""
    plt = plotting.pyplot()
    x = np.array([r["budget"] for r in rows])
    cert = np.array([100 * r["certified_accuracy"] for r in rows])
    found = np.array([100 * r["accuracy"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    fp = 100 * rows[0]["fp_accuracy"]
    ax.axhline(fp, color="k", ls="--", lw=1, label=f"full precision: {fp:.1f}%")
    ax.fill_between(x, cert, found, color="tab:blue", alpha=0.25, lw=0,
                    label="bracket: certified to found")  # fmt: skip
    ax.plot(x, cert, color="tab:blue", marker="o", lw=1.5, label="certified (proved)")
    ax.plot(x, found, color="tab:red", marker="s", lw=1.5, label="found (worst allocation)")
    styles, markers = ("--", "-.", ":", (0, (5, 1))), ("v", "^", "D", "P")
    colors = ("tab:gray", "tab:orange", "tab:green", "tab:purple")  # not the bracket's
    for k, name in enumerate(searches):
        y = np.array([100 * r["searches"].get(name, np.nan) for r in rows])
        ax.plot(x, y, ls=styles[k % 4], marker=markers[k % 4], color=colors[k % 4], ms=4, lw=1,
                alpha=0.9, label=_SEARCH_LABELS[name])  # fmt: skip
    ax.set_xlabel("mean activation bits per site (budget)")
    ax.set_ylabel("test accuracy under DPTQ (%)")
    ax.set_xticks(x)
    ax.set_ylim(0, 105)
    ax.set_title("Worst-case accuracy bracket vs bit budget")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


config_lib.register("audit", RULES, checks=checks.NETWORK_CHECKS)
