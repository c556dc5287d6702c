"""ptq_adversary.audit.search: random and beam search stay feasible, are bounded by the exact
worst case, evaluate their starts, and reject bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import audit, policy
from ptq_adversary.audit import search
from tests.audit import cases
from tests.audit.cases import CHOICES


def test_neighbours_are_feasible_and_move_two_sites():
    budget = policy.Budget(CHOICES, 4, 4.0)
    start = np.broadcast_to(policy.uniform_allocation(budget), (2, 3, 4))
    cand = np.asarray(search.neighbours(jax.random.key(0), jnp.asarray(start), budget, 5))
    assert cand.shape == (10, 3, 4)
    values = np.asarray(budget.choices)[cand]
    assert cases.feasible(values, budget)
    changed = (cand != start[0][None]).sum(-1)
    assert np.all(changed == 2)  # the uniform allocation has > 5 feasible moves


def test_beam_search_with_random_restarts():
    model = cases.cnn(seed=4)
    x, y = cases.images(8, seed=2)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    r = audit.beam_search(model, x, y, budget, width=2, num_moves=2, num_iters=1, num_init=5,
                          example_chunk=8)  # fmt: skip
    assert r.evaluations == 1 + 5 + 2 * 2
    assert cases.feasible(r.worst_bits, budget) and cases.feasible(r.broken_bits, budget)
    exact_loss, _ = audit.exhaustive(model, x, y, cases.all_bits(budget))
    assert np.all(r.worst_loss <= exact_loss.max(axis=0) + 1e-5)


def test_low_bit_starts_put_one_site_at_the_lowest_choice():
    budget = policy.Budget(CHOICES, 4, 4.0)
    starts = audit.low_bit_starts(budget)
    bits = np.asarray(policy.to_bits(starts, budget))
    assert starts.shape == (4, 4) and len(np.unique(starts, axis=0)) == 4
    assert np.all(bits.sum(-1) == budget.total)
    assert sorted(np.argmin(bits, -1).tolist()) == [0, 1, 2, 3]
    assert np.all(np.sort(bits, -1)[:, :2] == [[2, 4]] * 4)  # 2 + the rest spread: 2,4,5,5
    # No room for the lowest choice (budget = the lowest choice everywhere), and L = 1.
    assert audit.low_bit_starts(policy.Budget(CHOICES, 3, 2.0)).shape[0] == 1
    assert audit.low_bit_starts(policy.Budget(CHOICES, 1, 4.0)).shape == (0, 1)


def test_beam_search_with_low_bit_starts_evaluates_them():
    model = cases.cnn(seed=4)
    x, y = cases.images(8, seed=2)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    kwargs = dict(width=1, num_moves=2, num_iters=1, example_chunk=8)
    r = audit.beam_search(model, x, y, budget, low_starts=True, **kwargs)
    assert r.evaluations == 1 + 4 + 2
    # Every low-bit start was evaluated: the found worst is at least each start's loss.
    start_bits = np.asarray(policy.to_bits(audit.low_bit_starts(budget), budget))
    loss, _ = audit.exhaustive(model, x, y, start_bits)
    assert np.all(r.worst_loss >= loss.max(axis=0) - 1e-6)
    assert cases.feasible(r.worst_bits, budget)


def test_searches_reject_float_labels_and_empty_batches():
    x, y = cases.images(4, 32)
    budget = policy.Budget(CHOICES, 4, 4.0)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        audit.random_search(
            cases.cnn(image_size=32), x, y.astype(np.float32), budget, num_samples=2
        )
    with pytest.raises(ValueError, match="at least one example"):
        audit.beam_search(cases.cnn(image_size=32), x[:0], y[:0], budget)
