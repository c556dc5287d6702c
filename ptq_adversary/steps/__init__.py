"""Step builders: where models, losses, quantizers and optimizers meet.

Each ``make_*`` takes already-built pieces (a model's graphdef, an optax optimizer) and the few
scalars it needs, and returns a pure function of arrays that the trainer jits. No config, no
I/O. Steps return flat dicts of scalar (or ``[P]``) arrays; the caller reduces and logs them.

Submodules, in dependency order (each imports only those above it):

* ``supervised``: full-precision steps: :class:`TrainState`, :func:`create_train_state`,
  :func:`make_supervised_train_step`, :func:`make_distill_train_step`.
* ``policies``: many allocations at once: :func:`map_policies` (chunked over the policy axis),
  :func:`uniform_bits`, :func:`make_eval_step`.
* ``pair``: stage B, a network and its policy: :class:`PairState`, :func:`create_pair_state`,
  :func:`sample_allocations`, :func:`make_pair_train_step`, :func:`make_pair_eval_step`,
  :data:`MODES`, :data:`REWARDS`.
"""

from ptq_adversary.steps.pair import (
    MODES,
    REWARDS,
    PairState,
    create_pair_state,
    make_pair_eval_step,
    make_pair_train_step,
    sample_allocations,
)
from ptq_adversary.steps.policies import make_eval_step, map_policies, uniform_bits
from ptq_adversary.steps.supervised import (
    TrainState,
    create_train_state,
    make_distill_train_step,
    make_supervised_train_step,
)

__all__ = [
    "MODES",
    "REWARDS",
    "PairState",
    "TrainState",
    "create_pair_state",
    "create_train_state",
    "make_distill_train_step",
    "make_eval_step",
    "make_pair_eval_step",
    "make_pair_train_step",
    "make_supervised_train_step",
    "map_policies",
    "sample_allocations",
    "uniform_bits",
]
