"""The budget-constrained bit-allocation distribution behind the bit-width policy.

A policy network outputs ``policy_logits [L, K]`` for one input: one row per quantization site
(in forward order) over ``K`` bit-width choices. An allocation is ``bit_idx [L]`` (indices into
the choices; ``bits = choices[bit_idx]``) and is feasible iff its bits sum to exactly
``L * budget``: the mean-bit budget holds for every input, not just on average.

The distribution is autoregressive over the sites in order, with a mask that keeps the
remaining budget reachable. At site ``l`` with remaining sum ``R`` and ``m = L - l`` sites left
(this one included), choice ``c`` is allowed iff ``R - c >= 0`` and the other ``m - 1`` sites
can sum to ``R - c`` (``Budget.reachable[m - 1, R - c]``)::

    pi(b | x) = prod_l softmax(mask_l(b_<l) + policy_logits[l])[b_l]

Every sampled or greedy allocation is therefore feasible by construction, every feasible
allocation has positive probability, and the log-probability is the sum of masked
log-softmaxes. The first site is never forced; the last one always is (one allowed choice).

Everything here is pure JAX and acts on **one example**; the caller vmaps over the batch
``B`` and the policy-sample axis ``P`` (rlax's convention). The :class:`Budget` is static and
hashable (pass it with ``static_argnames`` or close over it); its lookup tables are numpy
arrays that become compile-time constants. Bit allocations are data, so one compile serves
every allocation.

References:
  Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
  Learning", Machine Learning 1992 (the score-function gradient this log-prob feeds).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ptq_adversary.policy.budget import MASKED_LOGIT, Budget

__all__ = [
    "entropy",
    "greedy",
    "log_prob",
    "masked_logits",
    "sample",
    "sample_uniform",
    "to_bits",
]


# --------------------------------------------------------------------------------- the mask
def _allowed(remaining: jax.Array, sites_left: jax.Array, budget: Budget) -> jax.Array:
    """bool ``[..., K]``: the choices after which ``remaining`` stays reachable.

    ``remaining`` and ``sites_left`` (this site included) are int arrays of one (any) shape.
    """
    choices = jnp.asarray(budget.choices, jnp.int32)
    reachable = jnp.asarray(budget.reachable)
    rest = remaining[..., None] - choices  # [..., K]
    rest_idx = jnp.clip(rest, 0, reachable.shape[1] - 1)
    rows = jnp.clip(sites_left - 1, 0, budget.num_sites)[..., None]
    return (rest >= 0) & reachable[rows, rest_idx]


def _check_logits(policy_logits: ArrayLike, budget: Budget) -> jax.Array:
    policy_logits = jnp.asarray(policy_logits)
    expected = (budget.num_sites, budget.num_choices)
    if policy_logits.shape != expected:
        raise ValueError(
            f"policy_logits must have shape [L, K]={expected} for one example (vmap over batch "
            f"and policies), got {policy_logits.shape}"
        )
    # Compute in float32 at least, so MASKED_LOGIT stays finite for bf16/fp16 logits.
    return policy_logits.astype(jnp.promote_types(policy_logits.dtype, jnp.float32))


def _check_bit_idx(bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    bit_idx = jnp.asarray(bit_idx)
    if not jnp.issubdtype(bit_idx.dtype, jnp.integer):
        raise TypeError(f"bit_idx must be an integer array, got dtype {bit_idx.dtype}")
    if bit_idx.shape != (budget.num_sites,):
        raise ValueError(
            f"bit_idx must have shape [L]=({budget.num_sites},) for one example, got "
            f"{bit_idx.shape}"
        )
    return bit_idx.astype(jnp.int32)


def masked_logits(policy_logits: ArrayLike, bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    """Teacher-forced masked logits: each site's logits given the chosen prefix ``bit_idx[:l]``.

    Args:
      policy_logits: float ``[L, K]`` for one example.
      bit_idx: int ``[L]``, a feasible allocation (indices into ``budget.choices``).
      budget: the static :class:`Budget`.

    Returns:
      float32 (or wider) ``[L, K]``: ``policy_logits`` where the choice is allowed after the
      prefix, :data:`MASKED_LOGIT` elsewhere. The gradient w.r.t. masked entries is zero. If
      ``bit_idx`` is infeasible, some chosen entry is masked, so its log-prob is hugely negative.
    """
    policy_logits = _check_logits(policy_logits, budget)
    bit_idx = _check_bit_idx(bit_idx, budget)
    bits = to_bits(bit_idx, budget)
    spent_before = jnp.cumsum(bits) - bits  # exclusive prefix sums, [L]
    remaining = budget.total - spent_before
    sites_left = budget.num_sites - jnp.arange(budget.num_sites, dtype=jnp.int32)
    allowed = _allowed(remaining, sites_left, budget)
    return jnp.where(allowed, policy_logits, MASKED_LOGIT)


def log_prob(policy_logits: ArrayLike, bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    """Log-probability of one allocation under the masked autoregressive policy.

    Args:
      policy_logits: float ``[L, K]`` for one example.
      bit_idx: int ``[L]``, the allocation.
      budget: the static :class:`Budget`.

    Returns:
      float scalar: ``sum_l log_softmax(masked_logits)[l, bit_idx[l]]``; differentiable w.r.t.
      ``policy_logits`` (zero gradient at masked entries). ``exp`` of it sums to 1 over all
      feasible allocations.
    """
    logp = jax.nn.log_softmax(masked_logits(policy_logits, bit_idx, budget), axis=-1)
    bit_idx = jnp.asarray(bit_idx, jnp.int32)
    return jnp.sum(jnp.take_along_axis(logp, bit_idx[:, None], axis=-1))


def entropy(policy_logits: ArrayLike, bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    """Sum over sites of the entropy of the masked conditional along the path ``bit_idx``.

    By the chain rule of entropy, the expectation of this quantity under the policy
    (``bit_idx ~ pi``) equals the exact entropy of the whole allocation distribution,
    ``-sum_b pi(b) log pi(b)``; at sampled paths it is an unbiased estimate of it, with less
    variance than ``-log pi(b)`` (each site's term is averaged over that site's choices).
    Differentiating it at a fixed path gives the gradient of the per-site conditional
    entropies only (the dependence of the path distribution on the logits is
    ignored), the usual entropy-bonus surrogate.

    Args:
      policy_logits: float ``[L, K]`` for one example.
      bit_idx: int ``[L]``, the path (a feasible allocation).
      budget: the static :class:`Budget`.

    Returns:
      float scalar in nats, ``>= 0``. For equal logits it is ``sum_l log(#allowed_l)``: ``log K``
      at each site where no mask binds, 0 at the last site (always forced by the budget).
    """
    logp = jax.nn.log_softmax(masked_logits(policy_logits, bit_idx, budget), axis=-1)
    # Masked entries have p == 0 exactly and a finite log p, so p * log p is 0, never NaN.
    return -jnp.sum(jnp.exp(logp) * logp)


# -------------------------------------------------------------------------------- decoding
def _decode(
    site_logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise: jax.Array | None,
    budget: Budget,
) -> jax.Array:
    """The masked sequential decoder: per site, ``argmax(masked logits + noise[site])``.

    With Gumbel noise this samples each site's masked softmax (the Gumbel-max trick, which is
    what ``jax.random.categorical`` does); without noise it is the greedy decode. All the noise
    is drawn up front in one call, which compiles much faster than a PRNG call per scan step.

    Args:
      site_logits_fn: ``(site, remaining) -> [K]`` unmasked logits of that site's choices.
      noise: float ``[L, K]`` or ``None``.
      budget: the static :class:`Budget`.

    Returns:
      int32 ``bit_idx [L]``.
    """
    choices = jnp.asarray(budget.choices, jnp.int32)
    sites = jnp.arange(budget.num_sites, dtype=jnp.int32)

    def step(remaining, xs):
        site, site_noise = xs
        allowed = _allowed(remaining, budget.num_sites - site, budget)
        logits = jnp.where(allowed, site_logits_fn(site, remaining) + site_noise, MASKED_LOGIT)
        idx = jnp.argmax(logits)  # ties: the lower choice
        # Guard the exact budget against pathological logits (all allowed ones -inf or below
        # MASKED_LOGIT): fall back to the lowest allowed choice. NaNs are already harmless.
        idx = jnp.where(allowed[idx], idx, jnp.argmax(allowed)).astype(jnp.int32)
        return remaining - choices[idx], idx

    if noise is None:
        noise = jnp.zeros((budget.num_sites, budget.num_choices), jnp.float32)
    _, bit_idx = jax.lax.scan(step, jnp.int32(budget.total), (sites, noise))
    return bit_idx


def sample(key: jax.Array, policy_logits: ArrayLike, budget: Budget) -> jax.Array:
    """Draws one feasible allocation ``bit_idx ~ pi(. | policy_logits)``.

    Args:
      key: a PRNG key.
      policy_logits: float ``[L, K]`` for one example.
      budget: the static :class:`Budget`.

    Returns:
      int32 ``[L]`` whose bits sum to exactly ``budget.total``.
    """
    policy_logits = _check_logits(policy_logits, budget)
    gumbel = jax.random.gumbel(key, policy_logits.shape, policy_logits.dtype)
    return _decode(lambda site, _: policy_logits[site], gumbel, budget)


def greedy(policy_logits: ArrayLike, budget: Budget) -> jax.Array:
    """The deployment allocation: the masked argmax at each site in order.

    This is the per-site greedy decode, not necessarily the most probable allocation overall.

    Args:
      policy_logits: float ``[L, K]`` for one example.
      budget: the static :class:`Budget`.

    Returns:
      int32 ``[L]`` whose bits sum to exactly ``budget.total``; ties go to the lower choice.
    """
    policy_logits = _check_logits(policy_logits, budget)
    return _decode(lambda site, _: policy_logits[site], None, budget)


def sample_uniform(key: jax.Array, budget: Budget) -> jax.Array:
    """Draws an allocation uniformly at random from ALL feasible allocations.

    The reference "random feasible allocation" policy. Each site's choice is drawn with
    probability proportional to the number of feasible completions it leaves (``counts``),
    so every full allocation has probability ``1 / num_allocations(budget)`` (up to float32
    rounding of the log-counts, ~1e-7 relative).

    Args:
      key: a PRNG key.
      budget: the static :class:`Budget`.

    Returns:
      int32 ``[L]`` whose bits sum to exactly ``budget.total``.
    """
    choices = jnp.asarray(budget.choices, jnp.int32)
    log_counts = jnp.asarray(budget.log_counts)

    def site_logits(site, remaining):
        # Masked entries (rest < 0 or unreachable) are masked again by _decode.
        rest_idx = jnp.clip(remaining - choices, 0, log_counts.shape[1] - 1)
        return log_counts[budget.num_sites - site - 1, rest_idx]

    gumbel = jax.random.gumbel(key, (budget.num_sites, budget.num_choices), jnp.float32)
    return _decode(site_logits, gumbel, budget)


def to_bits(bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    """Bit-widths from choice indices: ``choices[bit_idx]`` for any shape (``[L]``, ``[P, B, L]``).

    Args:
      bit_idx: int array of any shape, entries in ``[0, K)``.
      budget: the :class:`Budget` (only its ``choices`` are used).

    Returns:
      int32 array of ``bit_idx``'s shape.
    """
    return jnp.asarray(budget.choices, jnp.int32)[jnp.asarray(bit_idx)]
