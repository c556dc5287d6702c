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

Everything here is pure JAX/numpy and acts on **one example**; the caller vmaps over the batch
``B`` and the policy-sample axis ``P`` (rlax's convention). The :class:`Budget` is static and
hashable (pass it with ``static_argnames`` or close over it); its lookup tables are numpy
arrays that become compile-time constants. Bit allocations are data, so one compile serves
every allocation.

References:
  Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
  Learning", Machine Learning 1992 (the score-function gradient this log-prob feeds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ptq_adversary.quant import MAX_BITS, MIN_BITS

__all__ = [
    "DEFAULT_CHOICES",
    "MASKED_LOGIT",
    "Budget",
    "InfeasibleBudgetError",
    "entropy",
    "enumerate_allocations",
    "greedy",
    "log_prob",
    "low_bit_starts",
    "masked_logits",
    "num_allocations",
    "sample",
    "sample_uniform",
    "to_bits",
    "uniform_allocation",
]

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
        choices summing to ``s`` (exact below 2^53; see :func:`num_allocations` for an exact
        int).
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
    def _exact_counts(self) -> list[list[int]]:
        # Python ints: exact for any L (float64 stops being exact at 2^53 allocations).
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
        out = np.array(self._exact_counts, dtype=np.float64)
        out.setflags(write=False)
        return out

    @functools.cached_property
    def reachable(self) -> np.ndarray:
        """bool ``[L + 1, L * max(choices) + 1]``: whether ``m`` choices can sum to ``s``."""
        out = np.array([[n > 0 for n in row] for row in self._exact_counts], dtype=bool)
        out.setflags(write=False)
        return out

    @functools.cached_property
    def _log_counts(self) -> np.ndarray:
        # Per-step logits of the uniform distribution over completions (MASKED_LOGIT where 0).
        with np.errstate(divide="ignore"):
            out = np.log(self.counts)
        return np.where(self.counts > 0, out, MASKED_LOGIT).astype(np.float32)


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
    log_counts = jnp.asarray(budget._log_counts)

    def site_logits(site, remaining):
        # Masked entries (rest < 0 or unreachable) are masked again by _decode.
        rest_idx = jnp.clip(remaining - choices, 0, log_counts.shape[1] - 1)
        return log_counts[budget.num_sites - site - 1, rest_idx]

    gumbel = jax.random.gumbel(key, (budget.num_sites, budget.num_choices), jnp.float32)
    return _decode(site_logits, gumbel, budget)


# ------------------------------------------------------------------------ host-side helpers
def num_allocations(budget: Budget) -> int:
    """The exact number of feasible allocations (ordered ``bit_idx`` sequences)."""
    return budget._exact_counts[budget.num_sites][budget.total]


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


def to_bits(bit_idx: ArrayLike, budget: Budget) -> jax.Array:
    """Bit-widths from choice indices: ``choices[bit_idx]`` for any shape (``[L]``, ``[P, B, L]``).

    Args:
      bit_idx: int array of any shape, entries in ``[0, K)``.
      budget: the :class:`Budget` (only its ``choices`` are used).

    Returns:
      int32 array of ``bit_idx``'s shape.
    """
    return jnp.asarray(budget.choices, jnp.int32)[jnp.asarray(bit_idx)]


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
