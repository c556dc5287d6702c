"""``ptq_adversary.policy.decode``: the masked distribution, sampling and decoding, jitted."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import policy
from ptq_adversary.policy import Budget
from tests.policy.cases import (
    BUDGETS,
    DEFAULT,
    SMALL,
    entropy_many,
    greedy_many,
    log_prob_many,
    random_logits,
)


# ----------------------------------------------------------------------- exact budget always
@functools.partial(jax.jit, static_argnames="budget")
def decode_all(key, logits_n, budget):
    """Sampled, greedy and uniformly random allocations for a batch of logits (one compile)."""
    keys = jax.random.split(key, (2, logits_n.shape[0]))
    return (
        jax.vmap(lambda k, lg: policy.sample(k, lg, budget))(keys[0], logits_n),
        jax.vmap(lambda lg: policy.greedy(lg, budget))(logits_n),
        jax.vmap(lambda k: policy.sample_uniform(k, budget))(keys[1]),
    )


@pytest.mark.parametrize(
    "budget", BUDGETS, ids=lambda b: f"L{b.num_sites}-b{b.budget:g}-{len(b.choices)}ch"
)
def test_sampled_and_greedy_allocations_meet_the_budget_exactly(budget):
    n = 256
    # Mix tame and extreme logits: extremes push hard towards infeasible corners.
    logits = jnp.concatenate(
        [random_logits(2, budget, n // 2), random_logits(3, budget, n // 2, scale=50.0)]
    )
    # Feasibility cannot depend on the noise, so an "rbg" key is used here: it compiles in a
    # fraction of threefry's time on CPU (the frequency tests below use the default threefry).
    for bit_idx in decode_all(jax.random.key(1, impl="rbg"), logits, budget):
        assert bit_idx.dtype == jnp.int32 and bit_idx.shape == (n, budget.num_sites)
        assert np.all((bit_idx >= 0) & (bit_idx < budget.num_choices))
        np.testing.assert_array_equal(
            np.sum(policy.to_bits(bit_idx, budget), axis=-1), budget.total
        )


def test_pathological_logits_still_meet_the_budget():
    budget = Budget(DEFAULT, 4, 7)
    logits = jnp.stack(
        [
            jnp.full((4, 6), -jnp.inf),
            jnp.full((4, 6), jnp.nan),
            jnp.full((4, 6), -1e30),
            jnp.zeros((4, 6)).at[:, 0].set(jnp.inf),  # pushes towards 2 bits everywhere
        ]
    )
    for bit_idx in decode_all(jax.random.key(0, impl="rbg"), logits, budget)[:2]:
        np.testing.assert_array_equal(np.sum(policy.to_bits(bit_idx, budget), axis=-1), 28)


# ------------------------------------------------------------------------ the distribution
@pytest.mark.parametrize(
    "budget", [SMALL, Budget(DEFAULT, 4, 7), Budget((2, 8), 3, 4), Budget(DEFAULT, 1, 5)]
)
def test_probabilities_sum_to_one_over_all_allocations(budget):
    allocations = policy.enumerate_allocations(budget)
    for seed in range(3):
        logp = log_prob_many(random_logits(seed, budget), allocations, budget)
        assert np.all(np.isfinite(logp)) and np.all(logp <= 1e-6)
        np.testing.assert_allclose(np.sum(np.exp(np.asarray(logp, np.float64))), 1.0, rtol=1e-5)


def test_infeasible_allocation_has_negligible_probability():
    logp = policy.log_prob(jnp.zeros((3, 6)), jnp.array([5, 5, 5]), SMALL)  # 24 bits != 12
    assert logp < -1e8


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


def _frequencies(bit_idx, allocations):
    index = {tuple(a): i for i, a in enumerate(allocations.tolist())}
    return np.bincount(
        [index[tuple(b)] for b in np.asarray(bit_idx).tolist()], minlength=len(allocations)
    )


def test_sampling_frequencies_match_exp_log_prob():
    budget, n = SMALL, 20_000
    allocations = policy.enumerate_allocations(budget)  # 22 of them: 21 degrees of freedom
    logits = random_logits(7, budget, scale=1.0)
    probs = np.exp(np.asarray(log_prob_many(logits, allocations, budget), np.float64))
    sampled, _, _ = decode_all(jax.random.key(8), jnp.broadcast_to(logits, (n, 3, 6)), budget)
    counts = _frequencies(sampled, allocations)
    # chi^2_21 has mean 21 and a 99.99% quantile of ~52; a biased sampler lands in the hundreds.
    assert _chi_square(counts, probs) < 55.0


def test_sample_uniform_is_uniform_over_feasible_allocations():
    budget, n = SMALL, 20_000
    allocations = policy.enumerate_allocations(budget)
    _, _, uniform = decode_all(jax.random.key(9), jnp.zeros((n, 3, 6)), budget)  # same compile
    counts = _frequencies(uniform, allocations)
    assert _chi_square(counts, np.full(len(allocations), 1 / len(allocations))) < 55.0
    # The masked policy with zero logits is NOT uniform over allocations; make sure the
    # test above could tell the difference.
    zero = np.exp(np.asarray(log_prob_many(jnp.zeros((3, 6)), allocations, budget), np.float64))
    assert _chi_square(zero * n, np.full(len(allocations), 1 / len(allocations))) > 200.0


def test_entropy_of_zero_logits_counts_the_allowed_choices():
    # L=2, budget 5 (sum 10): site 0 allows 2, 4, 5, 6, 8 (not 3: 7 is no choice); site 1 is
    # forced. So the path entropy is log 5 for every path.
    budget = Budget(DEFAULT, 2, 5)
    allocations = policy.enumerate_allocations(budget)
    np.testing.assert_allclose(
        entropy_many(jnp.zeros((2, 6)), allocations, budget), math.log(5), rtol=1e-6
    )
    # In general: sum over sites of log(#allowed); log K at every site where no mask binds.
    budget = Budget(DEFAULT, 4, 5)
    allocations = policy.enumerate_allocations(budget)
    ent = entropy_many(jnp.zeros((4, 6)), allocations, budget)
    masked = jax.vmap(lambda b: policy.masked_logits(jnp.zeros((4, 6)), b, budget))(allocations)
    num_allowed = np.sum(np.asarray(masked) > policy.MASKED_LOGIT / 2, axis=-1)
    np.testing.assert_allclose(ent, np.sum(np.log(num_allowed), axis=-1), rtol=1e-5, atol=1e-6)
    assert np.all(num_allowed[:, 0] == 6)  # the first site is free: log K there
    assert np.all(num_allowed[:, -1] == 1)  # the last site is always forced


@pytest.mark.parametrize("budget", [SMALL, Budget(DEFAULT, 4, 7), Budget((2, 4, 8), 4, 3.5)])
def test_expected_path_entropy_is_the_exact_sequence_entropy(budget):
    allocations = policy.enumerate_allocations(budget)
    logits = random_logits(11, budget, scale=1.5)
    logp = np.asarray(log_prob_many(logits, allocations, budget), np.float64)
    p = np.exp(logp)
    path_entropy = np.asarray(entropy_many(logits, allocations, budget), np.float64)
    np.testing.assert_allclose(np.sum(p * path_entropy), -np.sum(p * logp), rtol=1e-5)


def test_log_prob_and_entropy_gradients_are_finite_and_zero_where_masked():
    budget = Budget(DEFAULT, 4, 7)
    allocations = policy.enumerate_allocations(budget)
    grad_lp = jax.jit(
        jax.vmap(jax.grad(policy.log_prob), in_axes=(None, 0, None)), static_argnums=2
    )
    grad_ent = jax.jit(
        jax.vmap(jax.grad(policy.entropy), in_axes=(None, 0, None)), static_argnums=2
    )
    masks = jax.vmap(lambda b: policy.masked_logits(jnp.zeros((4, 6)), b, budget))(allocations)
    masked = np.asarray(masks) <= policy.MASKED_LOGIT / 2
    assert masked.any()
    for scale in (1.0, 1e4):  # extreme logits saturate the softmax
        logits = random_logits(12, budget, scale=scale)
        for grad_fn in (grad_lp, grad_ent):
            g = np.asarray(grad_fn(logits, allocations, budget))
            assert np.all(np.isfinite(g))
            assert np.all(g[masked] == 0.0)
    # log_prob's gradient per site is onehot(chosen) - softmax over the allowed choices.
    g = np.asarray(grad_lp(jnp.zeros((4, 6)), allocations, budget))
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-6)


def test_masked_logits_teacher_forcing_by_hand():
    # L=3, sum 12, path 2, 2, 8: site 0 free; site 1 has 10 left over 2 sites -> c in
    # {2, 4, 5, 6, 8} (10 - 3 = 7 is no choice); site 2 has 8 left -> only 8.
    out = np.asarray(policy.masked_logits(jnp.ones((3, 6)), jnp.array([0, 0, 5]), SMALL))
    allowed = out == 1.0
    np.testing.assert_array_equal(
        allowed, [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
    )
    assert np.all(out[~allowed] == policy.MASKED_LOGIT)


# ---------------------------------------------------------------------------------- greedy
def test_greedy_follows_dominant_preferences_and_matches_the_mode():
    budget = Budget(DEFAULT, 4, 7)
    allocations = policy.enumerate_allocations(budget)
    rng = np.random.default_rng(0)
    for target in allocations[rng.choice(len(allocations), 5, replace=False)]:
        logits = 10.0 * jax.nn.one_hot(target, 6) + 0.1 * random_logits(13, budget)
        np.testing.assert_array_equal(greedy_many(logits[None], budget)[0], target)
        mode = allocations[np.argmax(log_prob_many(logits, allocations, budget))]
        np.testing.assert_array_equal(mode, target)


def test_greedy_is_deterministic_and_breaks_ties_low():
    # Zero logits: lowest allowed choice each step: 2, 2, then the forced 8.
    np.testing.assert_array_equal(policy.greedy(jnp.zeros((3, 6)), SMALL), [0, 0, 5])
    logits = random_logits(14, SMALL, 8)
    np.testing.assert_array_equal(greedy_many(logits, SMALL), greedy_many(logits, SMALL))


def test_to_bits_any_shape():
    bit_idx = jnp.array([[[0, 5, 2]], [[1, 1, 1]]])  # [P=2, B=1, L=3]
    bits = policy.to_bits(bit_idx, SMALL)
    assert bits.dtype == jnp.int32 and bits.shape == (2, 1, 3)
    np.testing.assert_array_equal(bits, [[[2, 8, 4]], [[3, 3, 3]]])


# ------------------------------------------------------------------------ vmap, jit, shapes
def test_vmap_over_policies_and_batch_equals_a_loop():
    budget = Budget(DEFAULT, 4, 7)
    P, B = 3, 2
    keys = jax.random.split(jax.random.key(15), (P, B))
    logits = random_logits(16, budget, B)  # shared over P, as in training

    def all_fns(key, lg):
        b = policy.sample(key, lg, budget)
        return (
            b,
            policy.log_prob(lg, b, budget),
            policy.entropy(lg, b, budget),
            policy.greedy(lg, budget),
        )

    batched = jax.jit(jax.vmap(jax.vmap(all_fns), in_axes=(0, None)))(keys, logits)
    single_fn = jax.jit(all_fns)
    for p in range(P):
        for i in range(B):
            single = single_fn(keys[p, i], logits[i])
            for got, want in zip(batched, single, strict=True):
                np.testing.assert_allclose(got[p, i], want, rtol=1e-6)
    assert batched[0].shape == (P, B, 4)


def test_one_compile_serves_all_logits_and_allocations():
    traces = []

    @functools.partial(jax.jit, static_argnames="budget")
    def step(key, logits, bit_idx, budget):
        traces.append(None)
        return policy.sample(key, logits, budget), policy.log_prob(logits, bit_idx, budget)

    allocations = policy.enumerate_allocations(SMALL)
    for seed in range(4):
        step(jax.random.key(seed), random_logits(seed, SMALL), allocations[seed], SMALL)
    assert len(traces) == 1
    step(jax.random.key(0), random_logits(0, SMALL), allocations[0], Budget(DEFAULT, 3, 4))
    assert len(traces) == 1  # an equal Budget hits the cache


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"\[L, K\]"):
        policy.sample(jax.random.key(0), jnp.zeros((2, 3, 6)), SMALL)
    with pytest.raises(ValueError, match=r"\[L\]"):
        policy.log_prob(jnp.zeros((3, 6)), jnp.zeros((4,), jnp.int32), SMALL)
    with pytest.raises(TypeError, match="integer"):
        policy.log_prob(jnp.zeros((3, 6)), jnp.zeros((3,)), SMALL)
