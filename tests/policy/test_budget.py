"""``ptq_adversary.policy.budget``: validation and the counting tables of a Budget."""

import itertools
import math

import numpy as np
import pytest

from ptq_adversary import policy
from ptq_adversary.policy import Budget, InfeasibleBudgetError
from tests.policy.cases import DEFAULT, SMALL, brute_force


# -------------------------------------------------------------------------------- Budget
def test_budget_is_hashable_static_and_normalised():
    a = Budget([2, 3, 4, 5, 6, 8], 3, 4)
    b = Budget(DEFAULT, 3, 4.0)
    assert a == b and hash(a) == hash(b)
    assert a.choices == DEFAULT and isinstance(a.budget, float)
    assert a.total == 12 and a.num_choices == 6
    assert Budget(DEFAULT, 3, 13 / 3).total == 13


@pytest.mark.parametrize("budget", [SMALL, Budget((2, 4, 8), 4, 3.5), Budget((2, 8), 3, 4)])
def test_tables_match_brute_force(budget):
    for m in range(budget.num_sites + 1):
        sums = [sum(t) for t in itertools.product(budget.choices, repeat=m)]
        expected = np.bincount(sums, minlength=budget.counts.shape[1])  # m = 0: sum 0 once
        np.testing.assert_array_equal(budget.counts[m], expected)
        np.testing.assert_array_equal(budget.reachable[m], expected > 0)
    assert policy.num_allocations(budget) == len(brute_force(budget))


@pytest.mark.parametrize(
    "choices, num_sites, budget, fragment",
    [
        (DEFAULT, 3, 4.5, "budget 4.5 is infeasible for L=3 sites with choices (2,3,4,5,6,8)"),
        (DEFAULT, 3, 1, "budget 1 is infeasible"),  # below 2 bits
        (DEFAULT, 3, 9, "budget 9 is infeasible"),  # above 8 bits
        (DEFAULT, 1, 7, "budget 7 is infeasible for L=1"),  # inside [2, 8] but 7 is no choice
        (DEFAULT, 2, 7.5, "budget 7.5 is infeasible for L=2"),  # 15 = 8 + 7 or 6 + 9
        ((2, 4, 8), 3, 3, "budget 3 is infeasible"),  # odd total from even choices
    ],
)
def test_infeasible_budgets_are_rejected(choices, num_sites, budget, fragment):
    with pytest.raises(InfeasibleBudgetError) as info:
        Budget(choices, num_sites, budget)
    message = str(info.value)
    assert fragment in message
    assert "feasible mean-bit budgets lie in" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_infeasible_message_names_the_range_and_step():
    with pytest.raises(
        InfeasibleBudgetError, match=r"lie in \[2, 8\] in steps of 1/3, except 23/3"
    ):
        Budget(DEFAULT, 3, 4.5)
    with pytest.raises(InfeasibleBudgetError, match=r"lie in \[2, 8\] in steps of 1/2, except 7.5"):
        Budget(DEFAULT, 2, 7.5)


@pytest.mark.parametrize(
    "choices, num_sites",
    [
        ((3, 2), 3),
        ((2, 2, 4), 3),
        ((1, 2), 3),
        ((2, 17), 3),
        ((2.5, 4), 3),
        ((), 3),
        (DEFAULT, 0),
        (DEFAULT, 2.0),
    ],
)
def test_bad_choices_or_sites_are_rejected(choices, num_sites):
    with pytest.raises(InfeasibleBudgetError, match="choices|num_sites"):
        Budget(choices, num_sites, 4)


def test_exact_and_log_counts_agree_with_the_float_table():
    budget = Budget(DEFAULT, 4, 7)
    exact = np.array(budget.exact_counts, dtype=np.float64)
    np.testing.assert_array_equal(exact, budget.counts)
    assert all(isinstance(n, int) for row in budget.exact_counts for n in row)
    log_counts = budget.log_counts
    assert log_counts.dtype == np.float32 and log_counts.shape == budget.counts.shape
    positive = budget.counts > 0
    np.testing.assert_allclose(log_counts[positive], np.log(budget.counts[positive]), rtol=1e-6)
    assert np.all(log_counts[~positive] == policy.MASKED_LOGIT)
    # Exact where float64 is not: 20 sites have more than 2^53 allocations at some sums.
    big = Budget(DEFAULT, 20, 4)
    assert big.exact_counts[20][big.total] == policy.num_allocations(big)
    assert math.isclose(big.counts[20, big.total], policy.num_allocations(big), rel_tol=1e-15)
