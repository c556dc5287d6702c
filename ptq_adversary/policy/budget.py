"""The mean-bit budget: :class:`Budget`, its feasibility check and its counting tables.

An allocation over ``L`` sites is feasible iff its bits sum to exactly ``L * budget``.
:class:`Budget` validates a (choices, ``L``, budget) triple on construction (raising
:class:`InfeasibleBudgetError` with the feasible range) and carries the numpy tables that the
masked decoder (:mod:`ptq_adversary.policy.decode`) and the host-side enumeration
(:mod:`ptq_adversary.policy.allocations`) read: which partial sums are reachable, and how many
ways there are to reach them. It is static and hashable, so it can be a ``static_argnames``
argument of ``jax.jit``; its tables become compile-time constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from fractions import Fraction

import numpy as np

from ptq_adversary.quant import MAX_BITS, MIN_BITS

__all__ = ["DEFAULT_CHOICES", "MASKED_LOGIT", "Budget", "InfeasibleBudgetError"]

#: Default activation bit-width choices (docs/METHOD.md).
DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)

#: Value given to disallowed logits. Finite on purpose: ``exp(MASKED_LOGIT - max)`` is exactly 0
#: in float32, yet ``p * log p``, sums over sites and rescaling stay finite (``-inf`` would turn
#: ``0 * -inf`` into NaN in entropies and in the gradients of any downstream consumer).
MASKED_LOGIT = -1e9


class InfeasibleBudgetError(ValueError):
    """A (choices, num_sites, budget) triple that admits no exact allocation, or bad choices."""


def _fmt_bits(x: Fraction) -> str:
    # Exact: "7", "7.5", or "23/3" where no short decimal is exact.
    decimal = f"{float(x):g}"
    return decimal if Fraction(decimal) == x else f"{x.numerator}/{x.denominator}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """A fixed mean-bit budget over ``L`` quantization sites: static, hashable, validated.

    Attributes:
      choices: the ``K`` bit-width choices, sorted, unique integers in
        ``[MIN_BITS, MAX_BITS] = [2, 16]``.
      num_sites: ``L >= 1``, the number of quantization sites.
      budget: mean bits per site; ``L * budget`` must be an integer (to 1e-9) that ``L``
        choices can sum to, else :class:`InfeasibleBudgetError` is raised on construction.
        Stored as the float ``total / L``.

    Derived (numpy, built once per instance, not part of equality or the hash):
      total: ``L * budget`` as an int, the exact bit sum of every allocation.
      reachable: bool ``[L + 1, L * max(choices) + 1]``; ``reachable[m, s]`` iff ``m`` choices
        can sum to ``s``.
      counts: float64, same shape; ``counts[m, s]`` is the number of ordered sequences of ``m``
        choices summing to ``s`` (exact below 2^53; ``exact_counts`` and
        :func:`~ptq_adversary.policy.num_allocations` are exact ints).
      exact_counts: the same as nested lists of Python ints, exact for any ``L``.
      log_counts: float32, same shape; ``log(counts)``, :data:`MASKED_LOGIT` where 0.
    """

    choices: tuple[int, ...]
    num_sites: int
    budget: float

    def __post_init__(self):
        choices = self.choices
        try:
            choices = tuple(operator.index(c) for c in choices)
        except TypeError:
            raise InfeasibleBudgetError(
                f"choices {self.choices!r} are invalid: bit-width choices must be integers"
            ) from None
        if (
            not choices
            or any(b <= a for a, b in zip(choices, choices[1:], strict=False))
            or choices[0] < MIN_BITS
            or choices[-1] > MAX_BITS
        ):
            raise InfeasibleBudgetError(
                f"choices {choices} are invalid: need a non-empty, sorted tuple of unique "
                f"integers in [{MIN_BITS}, {MAX_BITS}]"
            )
        if isinstance(self.num_sites, bool):
            raise InfeasibleBudgetError(f"num_sites must be an int >= 1, got {self.num_sites!r}")
        try:
            num_sites = operator.index(self.num_sites)
        except TypeError:
            raise InfeasibleBudgetError(
                f"num_sites must be an int >= 1, got {self.num_sites!r}"
            ) from None
        if num_sites < 1:
            raise InfeasibleBudgetError(f"num_sites must be an int >= 1, got {num_sites}")
        budget = float(self.budget)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "num_sites", num_sites)
        object.__setattr__(self, "budget", budget)

        raw_total = num_sites * budget
        total = round(raw_total) if math.isfinite(raw_total) else None
        ok = total is not None and abs(raw_total - total) <= 1e-9 * max(1.0, abs(raw_total))
        ok = ok and 0 <= total < self.reachable.shape[1] and bool(self.reachable[num_sites, total])
        if not ok:
            raise InfeasibleBudgetError(
                f"budget {budget:g} is infeasible for L={num_sites} sites with choices "
                f"({','.join(map(str, choices))}): L*budget must be an integer reachable as a "
                f"sum of L choices; {self._feasible_range()}"
            )
        # Canonical value, so budgets that differ only by float rounding compare (and hash,
        # i.e. hit the jit cache) equal.
        object.__setattr__(self, "budget", total / num_sites)

    def _feasible_range(self) -> str:
        L = self.num_sites
        sums = np.flatnonzero(self.reachable[L])
        lo, hi = Fraction(int(sums[0]), L), Fraction(int(sums[-1]), L)
        step = "" if L == 1 else f" in steps of 1/{L}"
        gaps = sorted(set(range(int(sums[0]), int(sums[-1]) + 1)) - set(sums.tolist()))
        text = f"feasible mean-bit budgets lie in [{_fmt_bits(lo)}, {_fmt_bits(hi)}]{step}"
        if gaps:
            shown = ", ".join(_fmt_bits(Fraction(g, L)) for g in gaps[:8])
            text += f", except {shown}{', ...' if len(gaps) > 8 else ''}"
        return text

    @property
    def num_choices(self) -> int:
        """``K``, the number of bit-width choices."""
        return len(self.choices)

    @property
    def total(self) -> int:
        """``L * budget``: the exact bit sum of every feasible allocation."""
        return round(self.num_sites * self.budget)

    @functools.cached_property
    def exact_counts(self) -> list[list[int]]:
        """``[L + 1][L * max(choices) + 1]`` Python ints: ways ``m`` choices sum to ``s``.

        Exact for any ``L`` (float64 :attr:`counts` stops being exact at 2^53 allocations).
        """
        width = self.num_sites * self.choices[-1] + 1
        rows = [[1] + [0] * (width - 1)]
        for _ in range(self.num_sites):
            prev = rows[-1]
            rows.append(
                [sum(prev[s - c] for c in self.choices if s - c >= 0) for s in range(width)]
            )
        return rows

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """float64 ``[L + 1, L * max(choices) + 1]``: number of ways ``m`` choices sum to ``s``."""
        out = np.array(self.exact_counts, dtype=np.float64)
        out.setflags(write=False)
        return out

    @functools.cached_property
    def reachable(self) -> np.ndarray:
        """bool ``[L + 1, L * max(choices) + 1]``: whether ``m`` choices can sum to ``s``."""
        out = np.array([[n > 0 for n in row] for row in self.exact_counts], dtype=bool)
        out.setflags(write=False)
        return out

    @functools.cached_property
    def log_counts(self) -> np.ndarray:
        """float32 ``[L + 1, L * max(choices) + 1]``: ``log(counts)``, :data:`MASKED_LOGIT` at 0.

        The per-step logits of the uniform distribution over completions
        (:func:`~ptq_adversary.policy.sample_uniform`).
        """
        with np.errstate(divide="ignore"):
            out = np.log(self.counts)
        out = np.where(self.counts > 0, out, MASKED_LOGIT).astype(np.float32)
        out.setflags(write=False)
        return out
