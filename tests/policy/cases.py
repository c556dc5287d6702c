"""Budgets, test logits and jitted batch helpers the ``policy`` tests share."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import policy
from ptq_adversary.policy import Budget

DEFAULT = policy.DEFAULT_CHOICES
SMALL = Budget(DEFAULT, 3, 4)  # 22 feasible allocations

BUDGETS = [
    SMALL,
    Budget(DEFAULT, 4, 7),  # budget between choices (6 and 8)
    Budget(DEFAULT, 3, 7),  # ... where the 6/8 mix cannot make the sum 21 (5 + 8 + 8 can)
    Budget(DEFAULT, 1, 5),  # L = 1: the only site is forced
    Budget(DEFAULT, 20, 4),  # ResNet-18-sized
    Budget((2, 4, 8), 5, 3.2),  # sparse choices
    Budget((2, 8), 3, 4),  # only 2+2+8 orderings
]


@functools.partial(jax.jit, static_argnames="budget")
def greedy_many(logits_n, budget):
    """``policy.greedy`` over ``[N, L, K]`` logits."""
    return jax.vmap(lambda lg: policy.greedy(lg, budget))(logits_n)


@functools.partial(jax.jit, static_argnames="budget")
def log_prob_many(logits, bit_idx_n, budget):
    """``policy.log_prob`` of ``[N, L]`` allocations under one ``[L, K]`` logits."""
    return jax.vmap(lambda b: policy.log_prob(logits, b, budget))(bit_idx_n)


@functools.partial(jax.jit, static_argnames="budget")
def entropy_many(logits, bit_idx_n, budget):
    """``policy.entropy`` along ``[N, L]`` paths under one ``[L, K]`` logits."""
    return jax.vmap(lambda b: policy.entropy(logits, b, budget))(bit_idx_n)


def random_logits(seed, budget, n=None, scale=3.0):
    """float32 ``[L, K]`` (or ``[n, L, K]``) test logits; numpy's RNG avoids a compile per shape."""
    shape = (budget.num_sites, budget.num_choices)
    shape = shape if n is None else (n, *shape)
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def brute_force(budget):
    """All feasible bit_idx tuples by exhaustive search (lexicographic)."""
    return [
        idx
        for idx in itertools.product(range(budget.num_choices), repeat=budget.num_sites)
        if sum(budget.choices[k] for k in idx) == budget.total
    ]
