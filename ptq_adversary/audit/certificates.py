"""What :func:`~ptq_adversary.audit.certify` proves and finds, per example.

Each example ends in one of :data:`STATES` (its index, :attr:`CertifyResult.state`):
``certified`` (no feasible allocation misclassifies it: a proof, up to the soundness of the
bounds), ``broken`` (with the allocation) or ``unknown`` (node or time limit reached);
:data:`OPEN` marks an example still being searched. :func:`default_candidates` are the leaves
tried before the tree when none are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ptq_adversary import policy

__all__ = [
    "BROKEN",
    "CERTIFIED",
    "OPEN",
    "STATES",
    "UNKNOWN",
    "CertifyResult",
    "default_candidates",
]

#: Per-example outcome, indexed by :attr:`CertifyResult.state`.
STATES = ("certified", "broken", "unknown")
#: The codes of :data:`STATES`, and of an example still open during the search.
CERTIFIED, BROKEN, UNKNOWN, OPEN = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class CertifyResult:
    """What :func:`~ptq_adversary.audit.certify` proved and found (numpy arrays over ``B``
    examples, ``L`` sites).

    Attributes:
      state: int8 ``[B]``, an index into :data:`STATES`.
      bits: int32 ``[B, L]``: for a broken example a misclassifying allocation; otherwise the
        highest-loss allocation evaluated (``-1`` where no leaf was evaluated).
      worst_loss: float32 ``[B]``: the largest cross-entropy among the leaves evaluated
        (``-inf`` where none was).
      nodes: int64 ``[B]``: nodes evaluated per example (exact segment runs: root, inner
        nodes, leaves and candidates).
      bound_calls: nodes bounded (one interval pass each).
      pruned: nodes certified, whose subtrees were never evaluated.
      leaves: full allocations evaluated exactly.
      seconds: wall time.
      stopped: ``""``, or why some examples are unknown (``"node limit"``, ``"time limit"``).
      bounded_per_depth, pruned_per_depth: int64 ``[L]``: nodes bounded and certified at each
        depth (depth ``k``: sites ``0..k-1`` fixed).
    """

    state: np.ndarray
    bits: np.ndarray
    worst_loss: np.ndarray
    nodes: np.ndarray
    bound_calls: int
    pruned: int
    leaves: int
    seconds: float
    stopped: str = ""
    bounded_per_depth: np.ndarray | None = None
    pruned_per_depth: np.ndarray | None = None

    @property
    def certified_accuracy(self) -> float:
        """Share of examples proved correct under every feasible allocation (a lower bound)."""
        return float(np.mean(self.state == CERTIFIED))

    @property
    def accuracy(self) -> float:
        """Share of examples no evaluated allocation misclassifies (an upper bound)."""
        return float(np.mean(self.state != BROKEN))

    @property
    def exact(self) -> bool:
        """Whether the bracket is closed (no example unknown)."""
        return bool(np.all(self.state != UNKNOWN))

    @property
    def broken(self) -> np.ndarray:
        """bool ``[B]``: examples some evaluated allocation misclassifies."""
        return self.state == BROKEN

    def states(self) -> np.ndarray:
        """str ``[B]``: each example's state name."""
        return np.asarray(STATES)[self.state]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the bracket, its cost, and the per-example state."""
        return {
            "certified_accuracy": self.certified_accuracy,
            "accuracy": self.accuracy,
            "exact": self.exact,
            "nodes": int(self.nodes.sum()),
            "bound_calls": int(self.bound_calls),
            "pruned": int(self.pruned),
            "leaves": int(self.leaves),
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "bounded_per_depth": _ints(self.bounded_per_depth),
            "pruned_per_depth": _ints(self.pruned_per_depth),
            "states": {name: int(np.sum(self.state == i)) for i, name in enumerate(STATES)},
            "state": self.states().tolist(),
        }


def _ints(a) -> list[int] | None:
    return None if a is None else [int(v) for v in a]


def default_candidates(budget: policy.Budget) -> np.ndarray:
    """The leaves tried before branching when none are given: the uniform allocation and the
    low-bit starts (each site alone at its lowest feasible choice): int ``[1 + S, L]`` bits."""
    idx = np.concatenate([np.asarray(policy.uniform_allocation(budget))[None],
                          policy.low_bit_starts(budget)])  # fmt: skip
    return np.unique(np.asarray(policy.to_bits(idx, budget), np.int32), axis=0)
