"""Training: the shared loop and toolkit, and the trainers, each registering its config rules.

Importing this package imports every trainer, and each trainer module registers the rules of
its configs with :func:`ptq_adversary.config.register` (so ``config.validate`` knows them
all). :data:`TRAINERS` maps ``config.trainer`` to the trainer's entry point
``(config, workdir) -> results``. Submodules:

* :mod:`.loop`: :class:`Run`, the loop every trainer shares (workdir and ``config.json``,
  sharding, resume, logging, checkpoints, preemption, divergence).
* :mod:`.toolkit`: data, model, optimizer and evaluation helpers, and
  :func:`train_network`, the one skeleton of the supervised and distill trainers.
* :mod:`.checks`: the config checks that build the model (its arguments, its sites from
  shapes) and the one budget-feasibility check.
* :mod:`.supervised` (``"supervised"``): training on labels (the teacher).
* :mod:`.distill` (``"distill"``): stage A, distilling a black-box teacher's logits.
* :mod:`.policy_aware` (``"policy_aware"``): stage B, a robust or detrimental pair.
* :mod:`.pipeline` (``"pipeline"``): teacher, stages A and B, and the stage-C table.
* :mod:`.audit` (``"audit"``): the audit of a trained (or freshly trained) model as a command.
"""

from collections.abc import Callable
from typing import Any

from ptq_adversary.training import (
    audit,
    checks,
    distill,
    loop,
    pipeline,
    policy_aware,
    supervised,
    toolkit,
)
from ptq_adversary.training.loop import Preempted, Run, prepare_workdir
from ptq_adversary.training.toolkit import TrainedNetwork, train_network

__all__ = [
    "TRAINERS",
    "Preempted",
    "Run",
    "TrainedNetwork",
    "audit",
    "checks",
    "distill",
    "loop",
    "pipeline",
    "policy_aware",
    "prepare_workdir",
    "supervised",
    "toolkit",
    "train_network",
]

#: ``config.trainer`` -> the trainer's entry point ``(config, workdir) -> results dict``.
TRAINERS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "audit": audit.run_audit,
    "supervised": supervised.train_and_evaluate,
    "distill": distill.train_and_evaluate,
    "policy_aware": policy_aware.train_and_evaluate,
    "pipeline": pipeline.run_pipeline,
}
