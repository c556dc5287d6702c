"""Budgeted bit-width policies: the budget, the masked allocation distribution, the network.

A policy network outputs ``policy_logits [L, K]`` per input: one row per quantization site (in
forward order) over ``K`` bit-width choices. An allocation is ``bit_idx [L]`` (indices into the
choices; ``bits = choices[bit_idx]``) and is feasible iff its bits sum to exactly
``L * budget``. The distribution over allocations is autoregressive over the sites with a mask
that keeps the remaining budget reachable, so every sampled or greedy allocation is feasible by
construction. The decoding functions act on **one example** (vmap over batch and policies);
the :class:`Budget` is static and hashable.

Submodules, in dependency order (each imports only those above it):

* ``budget``: :class:`Budget` (validation, ``reachable`` / ``counts`` tables),
  :class:`InfeasibleBudgetError`, :data:`DEFAULT_CHOICES`, :data:`MASKED_LOGIT`.
* ``decode``: the masked distribution in JAX: :func:`masked_logits`, :func:`log_prob`,
  :func:`entropy`, :func:`sample`, :func:`greedy`, :func:`sample_uniform`, :func:`to_bits`.
* ``allocations``: host-side (numpy) :func:`num_allocations`, :func:`enumerate_allocations`,
  :func:`uniform_allocation`, :func:`low_bit_starts`.
* ``net``: the policy network :class:`PolicyNet` and :func:`greedy_allocation`, its greedy
  decode of a batch of images.
"""

from ptq_adversary.policy.allocations import (
    enumerate_allocations,
    low_bit_starts,
    num_allocations,
    uniform_allocation,
)
from ptq_adversary.policy.budget import DEFAULT_CHOICES, MASKED_LOGIT, Budget, InfeasibleBudgetError
from ptq_adversary.policy.decode import (
    entropy,
    greedy,
    log_prob,
    masked_logits,
    sample,
    sample_uniform,
    to_bits,
)
from ptq_adversary.policy.net import PolicyNet, greedy_allocation

__all__ = [
    "DEFAULT_CHOICES",
    "MASKED_LOGIT",
    "Budget",
    "InfeasibleBudgetError",
    "PolicyNet",
    "entropy",
    "enumerate_allocations",
    "greedy",
    "greedy_allocation",
    "log_prob",
    "low_bit_starts",
    "masked_logits",
    "num_allocations",
    "sample",
    "sample_uniform",
    "to_bits",
    "uniform_allocation",
]
