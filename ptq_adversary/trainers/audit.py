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
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ptq_adversary import artifacts, audit, config_lib, data, metrics, policy
from ptq_adversary.trainers import loop, supervised

__all__ = ["SOURCES", "run_audit", "rules"]

log = logging.getLogger(__name__)

SOURCES = ("teacher", "student", "robust", "detrimental", "fresh")


def rules() -> list[Any]:
    """Validation rules of an audit config (used by :func:`config_lib.validate`)."""
    R = config_lib._Rule

    def methods(v: Any) -> str | None:
        if not isinstance(v, list | tuple) or not v or any(m not in audit.METHODS for m in v):
            return f"must be a non-empty list of {list(audit.METHODS)}, got {v!r}"
        return None

    def boolean(v: Any) -> str | None:
        return None if isinstance(v, bool) else f"must be True or False, got {v!r}"

    pos_int, pos_float = config_lib._positive(int), config_lib._positive(float)
    return [
        *config_lib._common_rules(),
        R("source.kind", config_lib._one_of(SOURCES)),
        R("audit.choices", config_lib._choices),
        R("audit.budget", pos_float),
        R("audit.methods", methods),
        R("audit.num_examples", pos_int, optional=True),
        R("audit.max_allocations", pos_int),
        R("audit.beam_width", pos_int),
        R("audit.num_moves", pos_int),
        R("audit.num_iters", pos_int),
        R("audit.low_starts", boolean),
        R("audit.num_random", pos_int, optional=True),
        R("audit.example_chunk", pos_int),
        R("audit.policy.steps", pos_int),
        R("audit.policy.batch_size", pos_int),
        R("audit.policy.learning_rate", pos_float),
        R("audit.policy.widths", config_lib._widths),
        R("audit.policy.train_examples", pos_int, optional=True),
    ]


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
    """The budget must be feasible for the audited model's sites (ConfigError otherwise)."""
    if config.source.kind == "fresh":  # sites do not depend on classes or channels
        num_sites = config_lib.abstract_num_sites(config)
    else:
        num_sites = artifacts.load_model(_model_dir(config)).num_sites
    try:
        policy.Budget(tuple(config.audit.choices), num_sites, float(config.audit.budget))
    except policy.InfeasibleBudgetError as err:
        raise config_lib.ConfigError("audit.budget", str(err)) from None


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
    dataset = supervised.load_data(config)
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
    result = audit.audit(
        model, images, labels, choices=tuple(a.choices), budget=a.budget,
        methods=tuple(a.methods), max_allocations=a.max_allocations,
        beam_width=a.beam_width, num_moves=a.num_moves, num_iters=a.num_iters,
        low_starts=a.low_starts, num_random=a.num_random,
        policy_config=audit.PolicyConfig(
            steps=a.policy.steps, batch_size=a.policy.batch_size,
            num_samples=a.policy.num_samples, learning_rate=a.policy.learning_rate,
            entropy_coef=a.policy.entropy_coef, widths=tuple(a.policy.widths)),
        train_images=train_images, train_labels=dataset.train.labels[idx],
        seed=config.seed, example_chunk=a.example_chunk, progress=config.log.progress,
    )  # fmt: skip
    title = (f"DPTQ audit: {config.source.kind} ({loaded.spec.name}) on {dataset.name} test, "
             f"first {n} images")  # fmt: skip
    audit.write_report(result, workdir, title=title)
    summary = {"source": config.source.kind, "model_dir": model_dir,
               "model": loaded.spec.name, "dataset": dataset.name, **result.summary()}  # fmt: skip
    metrics.write_json_atomic(os.path.join(workdir, "results.json"), summary)
    with open(os.path.join(workdir, "summary.md"), encoding="utf-8") as f:
        print("\n" + f.read().split("\n## ")[0], flush=True)
    return summary
