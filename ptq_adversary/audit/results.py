"""What an audit reports: per-method outcomes, the audit's result, per-example statuses.

:class:`MethodResult` is one method's outcome, :class:`AuditResult` the audit of one model at
one budget; :func:`example_status` names each example's status (:data:`STATUSES`), in the
order of :meth:`AuditResult.ranking`. :data:`STRENGTH` orders the methods for the breaking
allocation reported per example, :data:`METHOD_LABELS` names them in reports and plots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "METHOD_LABELS",
    "STATUSES",
    "STRENGTH",
    "AuditResult",
    "MethodResult",
    "example_status",
    "status_codes",
]


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's outcome on the audited examples.

    Attributes:
      accuracy: fraction of examples classified correctly under the method's allocations. For
        a search (random search, greedy, beam, exhaustive): correct under *every* allocation it
        evaluated, so exhaustive gives the exact worst-case (oracle) accuracy.
      broken: bool ``[B]``: FP-correct examples the method misclassified.
      worst_loss: float32 ``[B]``: the largest quantized cross-entropy reached.
      bits: int32 ``[B, L]``: the allocation behind it (for searches, the misclassifying one
        where there is one).
      evaluations: forward passes per example (``certify``: nodes evaluated per example, on
        average; most are partial passes).
      seconds: wall time.
      extra: method-specific headline numbers merged into :meth:`AuditResult.summary`
        (``certify``: :meth:`~ptq_adversary.audit.CertifyResult.summary`).
    """

    accuracy: float
    broken: np.ndarray
    worst_loss: np.ndarray
    bits: np.ndarray
    evaluations: int
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The audit of one model at one budget (numpy arrays over ``B`` examples, ``L`` sites).

    Attributes:
      site_names: ``L`` site names (``model.site_names`` or ``site0..``).
      choices, budget: the bit budget audited.
      num_allocations: the number of budget-feasible allocations.
      fp_accuracy: full-precision accuracy.
      fp_correct, fp_loss, fp_margin: per example; the margin is the true-class logit minus the
        best other logit (negative when FP is wrong).
      labels: int ``[B]``.
      methods: :class:`MethodResult` per method run (:data:`~ptq_adversary.audit.METHODS`;
        ``random`` also yields ``random_search``), in the order run.
      random_accuracy: expected accuracy under one random feasible allocation (if run).
      vulnerable: bool ``[B]``: FP-correct and misclassified by some allocation found by any
        method (all of them, with ``exhaustive``).
      loss_increase: float32 ``[B]``: worst quantized loss found minus FP loss.
      breaking_bits: int32 ``[B, L]``: an allocation that misclassifies the example (the
        highest-loss one found; the worst-loss allocation where none does).
      min_low_bit_sites: int ``[B]``: with ``exhaustive``, the fewest sites below the budget
        (``bits < budget``) of any misclassifying allocation; ``-1`` if none or not known.
      worst_static: with ``exhaustive``, the single allocation (same for every example) with
        the lowest accuracy: ``{"bits": [...], "accuracy": float}``.
      skipped: methods not run and why.
      notes: searches run differently from what was asked and why, by method name (a search
        whose evaluations per example reach the number of feasible allocations runs as exact
        enumeration, see :func:`~ptq_adversary.audit.audit`).
    """

    site_names: tuple[str, ...]
    choices: tuple[int, ...]
    budget: float
    num_allocations: int
    fp_accuracy: float
    fp_correct: np.ndarray
    fp_loss: np.ndarray
    fp_margin: np.ndarray
    labels: np.ndarray
    methods: dict[str, MethodResult]
    random_accuracy: float | None
    vulnerable: np.ndarray
    loss_increase: np.ndarray
    breaking_bits: np.ndarray
    min_low_bit_sites: np.ndarray
    worst_static: dict[str, Any] | None
    skipped: dict[str, str]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def ranking(self) -> np.ndarray:
        """Example indices, most vulnerable first.

        The vulnerable examples (correct in FP and broken by some method), then the robust
        ones (correct in FP, broken by none), then those already wrong in FP (nothing to
        break); each group by decreasing loss increase. See :func:`example_status`.
        """
        return np.lexsort((-self.loss_increase, status_codes(self)))

    def summary(self) -> dict[str, Any]:
        """JSON-ready headline numbers (no per-example arrays)."""
        fp_right = self.fp_correct.astype(bool)
        return {
            "num_examples": self.num_examples,
            "site_names": list(self.site_names),
            "choices": list(self.choices),
            "budget": self.budget,
            "num_allocations": self.num_allocations,
            "fp_accuracy": self.fp_accuracy,
            "random_accuracy": self.random_accuracy,
            "methods": {
                name: {
                    "accuracy": m.accuracy,
                    "drop_points": round(100.0 * (self.fp_accuracy - m.accuracy), 4),
                    "flip_rate": float(m.broken[fp_right].mean()) if fp_right.any() else 0.0,
                    "evaluations_per_example": m.evaluations,
                    "seconds": round(m.seconds, 2),
                    **m.extra,
                }
                for name, m in self.methods.items()
            },
            "vulnerable_fraction": float(np.mean(status_codes(self) == 0)),
            "mean_loss_increase": float(self.loss_increase.mean()),
            "worst_static": self.worst_static,
            "skipped": self.skipped,
            "notes": self.notes,
        }


#: Per-example status, in ranking order (:func:`example_status`).
STATUSES = ("vulnerable", "robust", "wrong_in_fp")


def status_codes(result: AuditResult) -> np.ndarray:
    """Index into :data:`STATUSES` per example: int ``[B]``."""
    fp_right = np.asarray(result.fp_correct, bool)
    vulnerable = np.asarray(result.vulnerable, bool) & fp_right
    return np.where(vulnerable, 0, np.where(fp_right, 1, 2))


def example_status(result: AuditResult) -> np.ndarray:
    """Each example's status: ``"vulnerable"`` (correct in FP, misclassified by an allocation
    some method found), ``"robust"`` (correct in FP, no allocation found breaks it) or
    ``"wrong_in_fp"`` (misclassified already in full precision: nothing to break).

    Returns:
      str numpy ``[B]``.
    """
    return np.asarray(STATUSES)[status_codes(result)]


#: Strongest first: where several methods break an example, report the strongest's allocation
#: (keys of :attr:`AuditResult.methods`).
STRENGTH = ("exhaustive", "certify", "beam", "greedy", "random_search", "policy", "uniform")

#: How reports and plots name each method (keys of :attr:`AuditResult.methods`).
METHOD_LABELS = {
    "uniform": "uniform (static)",
    "random_search": "random search",
    "greedy": "greedy search",
    "beam": "beam search",
    "policy": "learned policy",
    "exhaustive": "exhaustive (oracle)",
    "certify": "certify (branch and bound)",
}
