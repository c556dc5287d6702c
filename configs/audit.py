r"""Audit a trained model's worst case under dynamic PTQ (ptq_adversary.audit).

Command (after the pipeline, ``make run``, has filled runs/fmnist_pair)::

  python -m ptq_adversary.main --config=configs/audit.py:source=student,pipeline=runs/fmnist_pair \
      --workdir=runs/audit_student

  # also bracket the worst case at 3, 3.5, 4.5 and 5 mean bits (brackets.json/.csv/.png):
  python -m ptq_adversary.main \
      --config=configs/audit.py:source=student,pipeline=runs/fmnist_pair,budgets=3/3.5/4.5/5 \
      --workdir=runs/audit_student --config.audit.certify.time_limit=600

Args (``--config=configs/audit.py:source=robust,pipeline=DIR,examples=2000``):
  smoke: a tiny model trained here for a few steps (``source=fresh``), 64 test images, short
    searches and a node-limited certify (tests and CI).
  source: ``student`` (default; the stage-A student, never trained to fail), ``teacher``,
    ``robust`` or ``detrimental`` (a pair's selected network), or ``fresh`` (train a ``cnn``
    here with configs/fmnist_cnn.py's recipe first; ``--config.model.factory=pkg.mod:build``
    trains and audits your own ``flax.nnx`` architecture instead).
  pipeline: the pipeline workdir holding the source (default runs/fmnist_pair).
  examples: how many test images to audit (default 1000, the first ones of the test split).
  budget: mean activation bits per site (default 4, the pipeline's).
  choices: the activation bit-width choices, ``/``-separated (default ``2/3/4/5/6/8``), e.g.
    ``choices=4/5/6/8``; sets ``config.audit.choices``.
  budgets: extra budgets to bracket, ``/``-separated (default none), e.g. ``budgets=3/4.5/5``;
    sets ``config.audit.bracket_budgets``. Every budget must be feasible for the model's
    sites and the choices (``L * budget`` an integer the choices can sum to).

Methods: uniform, random (one draw, and random search), greedy and beam search, the learned
policy (REINFORCE against the frozen network on 10000 train images), the exhaustive exact
worst case over all feasible allocations (109 for the 4-site CNN at choices {2,3,4,5,6,8},
budget 4), and certify: branch and bound over the allocations (ptq_adversary.certify) that,
per example, proves no feasible allocation misclassifies it (sound interval bounds prune whole
subtrees), or finds one that does (the other methods' finds are tried first), or, past its
node or time limit, neither. Its result is a bracket: ``certified_accuracy`` (a proved lower
bound of the worst-case accuracy) and ``accuracy`` (the found upper bound), equal when no
example is left unknown. Unlike exhaustive it needs no enumeration of the allocations.

``config.audit.certify``: ``node_limit`` (most nodes per example; None: no limit),
``time_limit`` (seconds for the whole certify run; None: no limit) and ``bounds``: ``"auto"``
(default: bound a depth's nodes only where a probe of them certifies enough to pay),
``"on"`` (bound every inner node) or ``"off"`` (no bounds: break-pruning alone, the exact
answer by search), i.e. certify's ``bounds="auto" / True / False``.

``config.audit.bracket_budgets``: after the main audit, each of these budgets is audited with
the configured methods other than ``policy`` and ``exhaustive``, plus ``certify`` (the main
budget, if listed and the main audit ran certify, reuses the main audit), and the workdir gets
``brackets.json``, ``brackets.csv`` and ``bracket_vs_budget.png``: per budget the certified and
found accuracy, the bracket's width, whether it is exact, certify's nodes and seconds, and each
search's accuracy; summary.md gets the table. Measured results: docs/AUDIT.md ("Measured: the
default pipeline's networks" and "Measured: certified brackets").
"""

import os

import ml_collections

from ptq_adversary import config as config_lib


def _numbers(key: str, text: str, kind: type) -> tuple:
    """``"4/4.5/5"`` -> ``(4.0, 4.5, 5.0)`` (``kind`` each); ``""`` -> ``()``."""
    if not text.strip():
        return ()
    try:
        return tuple(kind(t) for t in text.split("/"))
    except ValueError:
        raise config_lib.ConfigError(
            f"arg.{key}",
            f"expected {kind.__name__}s separated by '/' (e.g. {key}=4/5/6), got {text!r}",
        ) from None


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, smoke=False, source="student", pipeline="runs/fmnist_pair", examples=1000,
        budget=4.0, choices="", budgets="",
    )  # fmt: skip
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fmnist_cnn.py")
    base = config_lib.load_config_file(path, "smoke,model=cnn" if arg.smoke else "model=cnn")
    config = ml_collections.ConfigDict()
    config.trainer = "audit"
    config.seed = 0
    for key in ("data", "model", "optim", "eval", "log", "ckpt"):  # model/optim: source=fresh
        config[key] = base[key]

    config.source = ml_collections.ConfigDict()
    config.source.kind = "fresh" if arg.smoke else arg.source
    config.source.pipeline_dir = arg.pipeline

    config.audit = ml_collections.ConfigDict()
    config.audit.choices = _numbers("choices", arg.choices, int) or (2, 3, 4, 5, 6, 8)
    config.audit.budget = arg.budget
    config.audit.methods = (
        "uniform", "random", "greedy", "beam", "policy", "exhaustive", "certify",
    )  # fmt: skip
    config.audit.num_examples = arg.examples
    config.audit.max_allocations = 5000  # exhaustive only up to this many allocations
    # Searches: 1 + L + num_iters * beam_width * num_moves = 69 forward passes per example for
    # the 4-site student (L low-bit starts: each site alone at the lowest choice; 65 without),
    # and random search gets the same number (num_random None).
    config.audit.beam_width = 4
    config.audit.num_moves = 4
    config.audit.num_iters = 4
    config.audit.low_starts = True
    config.audit.num_random = ml_collections.config_dict.placeholder(int)
    config.audit.example_chunk = 128
    config.audit.policy = ml_collections.ConfigDict()
    config.audit.policy.steps = 300
    config.audit.policy.batch_size = 64
    config.audit.policy.num_samples = 8
    config.audit.policy.learning_rate = 3e-3
    config.audit.policy.entropy_coef = 0.01
    config.audit.policy.widths = (8, 16)
    config.audit.policy.train_examples = 10000
    config.audit.certify = ml_collections.ConfigDict()
    config.audit.certify.node_limit = ml_collections.config_dict.placeholder(int)
    config.audit.certify.time_limit = ml_collections.config_dict.placeholder(float)
    config.audit.certify.bounds = "auto"  # "auto", "on" or "off"
    config.audit.bracket_budgets = _numbers("budgets", arg.budgets, float)

    if arg.smoke:
        config.audit.num_examples = 64
        config.audit.num_iters = 1
        config.audit.num_moves = 2
        config.audit.beam_width = 2
        config.audit.example_chunk = 32
        config.audit.policy.steps = 2
        config.audit.policy.batch_size = 16
        config.audit.policy.num_samples = 2
        config.audit.policy.widths = (4,)
        config.audit.policy.train_examples = 64
        config.audit.certify.node_limit = 500  # the 4-site CNN needs fewer: a guard only
        config.audit.certify.time_limit = 120.0
    return config
