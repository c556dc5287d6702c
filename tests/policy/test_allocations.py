"""``ptq_adversary.policy.allocations``: counting, enumeration and reference allocations."""

import numpy as np
import pytest

from ptq_adversary import policy
from ptq_adversary.policy import Budget
from tests.policy.cases import DEFAULT, SMALL, brute_force


# --------------------------------------------------------------------- host-side helpers
@pytest.mark.parametrize("budget", [SMALL, Budget((2, 4, 8), 4, 3.5), Budget(DEFAULT, 1, 5)])
def test_enumerate_allocations_is_complete_and_lexicographic(budget):
    allocations = policy.enumerate_allocations(budget)
    assert allocations.dtype == np.int32
    assert [tuple(a) for a in allocations.tolist()] == brute_force(budget)


def test_enumerate_allocations_refuses_large_counts_before_enumerating():
    big = Budget(DEFAULT, 20, 4)
    assert policy.num_allocations(big) > 10**12
    with pytest.raises(ValueError, match="exceed limit"):
        policy.enumerate_allocations(big, limit=1000)


@pytest.mark.parametrize(
    "num_sites, budget, expected_bits",
    [
        (4, 4, [4, 4, 4, 4]),  # the budget is a choice
        (4, 7, [6, 8, 6, 8]),  # half 6, half 8, interleaved
        (2, 4.5, [4, 5]),
        (5, 3.4, [3, 4, 3, 4, 3]),  # 3 x 3 + 2 x 4
        (3, 7, [8, 5, 8]),  # 6/8 cannot make 21: nearest feasible mix
        (1, 8, [8]),
    ],
)
def test_uniform_allocation_by_hand(num_sites, budget, expected_bits):
    b = Budget(DEFAULT, num_sites, budget)
    bit_idx = policy.uniform_allocation(b)
    assert bit_idx.dtype == np.int32 and bit_idx.shape == (num_sites,)
    np.testing.assert_array_equal(policy.to_bits(bit_idx, b), expected_bits)


def test_uniform_allocation_meets_every_feasible_budget():
    for choices in (DEFAULT, (2, 4, 8), (3, 5)):
        for num_sites in (1, 2, 3, 7, 12):
            probe = Budget(choices, num_sites, choices[0])
            for total in np.flatnonzero(probe.reachable[num_sites]):
                b = Budget(choices, num_sites, total / num_sites)
                bits = np.asarray(policy.to_bits(policy.uniform_allocation(b), b))
                assert bits.sum() == b.total
                assert bits.max() - bits.min() <= choices[-1] - choices[0]
                if b.budget in choices:
                    assert np.all(bits == b.budget)


def test_low_bit_starts_put_one_site_at_the_lowest_choice():
    budget = Budget(DEFAULT, 4, 5)
    starts = policy.low_bit_starts(budget)
    assert starts.dtype == np.int32 and starts.shape == (4, 4)
    bits = np.asarray(policy.to_bits(starts, budget))
    np.testing.assert_array_equal(bits.sum(-1), budget.total)
    np.testing.assert_array_equal(np.diag(bits), DEFAULT[0])
    assert policy.low_bit_starts(Budget(DEFAULT, 1, 5)).shape == (0, 1)
