"""Host-side (numpy) allocation helpers: counting, enumeration and reference allocations.

:func:`num_allocations` and :func:`enumerate_allocations` count and list every feasible
allocation of a :class:`~ptq_adversary.policy.Budget`; :func:`uniform_allocation` is the
reference "as even as the choices allow" allocation and :func:`low_bit_starts` the ``L``
single-site extremes that local searches start from. All return choice indices ``bit_idx``
(``policy.to_bits`` maps them to bit-widths).
"""

from __future__ import annotations

import numpy as np

from ptq_adversary.policy.budget import Budget, InfeasibleBudgetError

__all__ = ["enumerate_allocations", "low_bit_starts", "num_allocations", "uniform_allocation"]


def num_allocations(budget: Budget) -> int:
    """The exact number of feasible allocations (ordered ``bit_idx`` sequences)."""
    return budget.exact_counts[budget.num_sites][budget.total]


def enumerate_allocations(budget: Budget, limit: int = 100_000) -> np.ndarray:
    """All feasible allocations, in lexicographic order of ``bit_idx``.

    Args:
      budget: the :class:`Budget`.
      limit: refuse (``ValueError``) if there are more than this many allocations; the count
        comes from the counts table before anything is enumerated.

    Returns:
      int32 numpy ``[N, L]`` of ``bit_idx`` with ``N = num_allocations(budget)``.
    """
    n = num_allocations(budget)
    if n > limit:
        raise ValueError(
            f"{n} feasible allocations for L={budget.num_sites}, choices {budget.choices}, "
            f"budget {budget.budget:g} exceed limit={limit}"
        )
    choices = np.asarray(budget.choices, np.int64)
    prefixes = np.zeros((1, 0), np.int32)
    remaining = np.array([budget.total], np.int64)
    for site in range(budget.num_sites):
        rest = remaining[:, None] - choices[None, :]
        rest_idx = np.clip(rest, 0, budget.reachable.shape[1] - 1)
        allowed = (rest >= 0) & budget.reachable[budget.num_sites - site - 1][rest_idx]
        rows, cols = np.nonzero(allowed)  # row-major: keeps lexicographic order
        prefixes = np.concatenate([prefixes[rows], cols[:, None].astype(np.int32)], axis=1)
        remaining = rest[rows, cols]
    assert len(prefixes) == n, (len(prefixes), n)
    return prefixes


def uniform_allocation(budget: Budget) -> np.ndarray:
    """The reference "uniform" allocation: as even as the choices allow, exact sum, deterministic.

    Every site gets the budget if it is a choice. Otherwise the allocation minimises
    ``sum_l (bits_l - budget)^2`` subject to the exact sum; by convexity that is the mix of the
    two neighbouring choices whenever that mix can meet the sum (budget 7 with choices
    ``(..., 6, 8)`` and even ``L``: half 6, half 8), else the nearest feasible multiset. The
    chosen bit-widths are spread evenly over the sites (running sum kept closest to
    ``l * budget``, ties to the lower choice), e.g. 6, 8, 6, 8 rather than 6, 6, 8, 8.

    Args:
      budget: the :class:`Budget`.

    Returns:
      int32 numpy ``[L]`` of ``bit_idx``.
    """
    L, total, choices = budget.num_sites, budget.total, budget.choices
    width = budget.reachable.shape[1]
    inf = float("inf")
    # Integer costs (scaled by L^2) so that ties are exact: (c*L - total)^2.
    cost = [(c * L - total) ** 2 for c in choices]
    # best[m][s]: minimal cost of m sites summing to s.
    best = [[inf] * width for _ in range(L + 1)]
    best[0][0] = 0
    for m in range(1, L + 1):
        for s in range(width):
            best[m][s] = min(
                (cost[k] + best[m - 1][s - c] for k, c in enumerate(choices) if s - c >= 0),
                default=inf,
            )
    bit_idx, remaining, spent = [], total, 0
    for site in range(L):
        m = L - site
        options = [
            k
            for k, c in enumerate(choices)
            if remaining - c >= 0 and cost[k] + best[m - 1][remaining - c] == best[m][remaining]
        ]
        k = min(options, key=lambda k: (abs((spent + choices[k]) * L - (site + 1) * total), k))
        bit_idx.append(k)
        remaining -= choices[k]
        spent += choices[k]
    assert remaining == 0
    return np.asarray(bit_idx, np.int32)


def low_bit_starts(budget: Budget) -> np.ndarray:
    """One allocation per site that puts that site at the lowest choice.

    Allocation ``i`` gives site ``i`` the lowest bit-width and spreads the rest of the exact
    bit sum over the other sites as evenly as the choices allow
    (:func:`uniform_allocation` of the remaining ``L - 1`` sites). Under a fixed budget
    the damaging allocations concentrate the cut on a few sites, and these are the ``L``
    single-site extremes: cheap, deterministic starting points for local search.

    Returns:
      int32 ``[S, L]`` distinct choice indices, ``S <= L`` (sites whose extreme cannot meet the
      budget are left out; none for ``L = 1``).
    """
    L = budget.num_sites
    if L < 2:
        return np.zeros((0, L), np.int32)
    lowest = budget.choices[0]
    try:
        rest_budget = Budget(budget.choices, L - 1, (budget.total - lowest) / (L - 1))
    except InfeasibleBudgetError:
        return np.zeros((0, L), np.int32)
    rest = uniform_allocation(rest_budget)
    starts = [np.insert(rest, i, 0) for i in range(L)]
    return np.unique(np.stack(starts).astype(np.int32), axis=0)
