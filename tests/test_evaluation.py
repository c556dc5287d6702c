"""Tests for ptq_adversary.evaluation: stage-C metrics of a tiny pair against a hand-written loop
over examples, and the markdown table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import artifacts, data, evaluation, models, policy, steps

N, BATCH, NUM_RANDOM = 20, 6, 2  # 20 examples in batches of 6: the last one holds 4 padding rows


@pytest.fixture(scope="module")
def pair():
    """A tiny user model (tests/user_model.py, 2 sites) and a policy whose greedy allocation
    varies by input and site."""
    spec = artifacts.ModelSpec("small", 10, 1, 8, kwargs={"width": 2}, image_size=(8, 8),
                               factory="tests.user_model:build")  # fmt: skip
    net = artifacts.build(spec, seed=3)
    g, p, r = models.split_model(net)
    model = artifacts.LoadedModel(spec, g, p, r, net.num_sites, tuple(net.site_names))
    pspec = artifacts.PolicySpec(num_sites=net.num_sites, in_channels=1, choices=(2, 3, 4, 5, 6),
                                 budget=4.0, widths=(4,))  # fmt: skip
    pg, pp, pr = nnx.split(artifacts.build_policy(pspec, seed=3), nnx.Param, ...)
    pp = jax.tree.map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), pp)
    return model, artifacts.LoadedPolicy(pspec, pg, pp, pr)


@pytest.fixture(scope="module")
def split_and_stats():
    rng = np.random.default_rng(0)
    split = data.Split(images=rng.integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8),
                       labels=rng.integers(0, 10, size=(N,)).astype(np.int32))  # fmt: skip
    return split, data.DatasetStats(np.asarray([0.5], np.float32), np.asarray([0.25], np.float32))


@pytest.fixture(scope="module")
def eval_step(pair):
    model, pol = pair
    budget = pol.spec.budget_spec
    return jax.jit(steps.make_pair_eval_step(model.graphdef, pol.graphdef, budget,
                                             num_random=NUM_RANDOM))  # fmt: skip


@pytest.fixture(scope="module")
def result(pair, split_and_stats, eval_step):
    split, stats = split_and_stats
    return evaluation.evaluate_pair(*pair, split, stats, batch_size=BATCH, num_random=NUM_RANDOM,
                                    seed=0, eval_step=eval_step)  # fmt: skip


def _by_hand(pair, split, stats):
    """One example and one allocation at a time: (fp right, greedy right, uniform right, bits)."""
    model, pol = pair
    budget = pol.spec.budget_spec
    g, p, r = model.graphdef, model.params, model.rest
    fp_logits = jax.jit(lambda x: models.apply_model(g, p, r, x)[0])
    q_logits = jax.jit(lambda x, bits: models.apply_model(g, p, r, x, bits)[0])
    policy_net = nnx.merge(pol.graphdef, pol.params, pol.rest)
    greedy_bits = jax.jit(lambda x: policy.to_bits(policy.greedy(policy_net(x)[0], budget), budget))
    uniform = policy.to_bits(jnp.asarray(policy.uniform_allocation(budget)), budget)
    images = data.normalize(split.images, stats.mean, stats.std)
    rows = []
    for i in range(len(split)):
        x, y = images[i : i + 1], int(split.labels[i])
        bits = greedy_bits(x)
        rows.append((
            int(np.argmax(fp_logits(x)[0]) == y),
            int(np.argmax(q_logits(x, bits[None])[0]) == y),
            int(np.argmax(q_logits(x, uniform[None])[0]) == y),
            np.asarray(bits),
        ))  # fmt: skip
    return rows


def test_metrics_equal_a_loop_over_examples(pair, split_and_stats, result):
    model, pol = pair
    budget = pol.spec.budget_spec
    rows = _by_hand(pair, *split_and_stats)
    fp = sum(row[0] for row in rows) / N
    dptq = sum(row[1] for row in rows) / N
    uniform = sum(row[2] for row in rows) / N
    assert result["num_examples"] == N  # padding rows never count
    assert result["fp_accuracy"] == pytest.approx(fp)
    assert result["dptq_accuracy"] == pytest.approx(dptq)
    assert result["uniform_accuracy"] == pytest.approx(uniform)
    assert result["drop"] == pytest.approx(100 * (fp - dptq))
    assert result["uniform_drop"] == pytest.approx(100 * (fp - uniform))
    assert result["flip_rate"] == pytest.approx(sum(a and not b for a, b, *_ in rows) / N)
    bits = np.stack([row[3] for row in rows])  # [N, L]
    assert len({tuple(b) for b in bits}) > 1 or len(set(bits[0])) > 1  # a non-trivial policy
    assert result["mean_bits"] == pytest.approx(bits.mean(axis=1).mean()) == 4.0
    hist = np.stack([(bits == c).mean(axis=0) for c in budget.choices], axis=1)  # [L, K]
    np.testing.assert_allclose(result["site_bit_histogram"], hist, atol=1e-6)
    assert result["budget"] == 4.0 and result["choices"] == [2, 3, 4, 5, 6]
    assert result["site_names"] == list(model.site_names)


def test_random_reference_counts_every_draw_once_and_repeats_with_the_seed(
    pair, split_and_stats, eval_step, result
):
    random = result["random_accuracy"]
    correct = random * N * NUM_RANDOM  # an integer count of right (example, draw) pairs
    assert 0 <= random <= 1 and correct == pytest.approx(round(correct), abs=1e-9)
    assert result["random_drop"] == pytest.approx(100 * (result["fp_accuracy"] - random))
    kwargs = dict(batch_size=BATCH, num_random=NUM_RANDOM, seed=0, eval_step=eval_step)
    again = evaluation.evaluate_pair(*pair, *split_and_stats, **kwargs)
    assert again == result


def test_format_table_has_one_row_per_pair():
    row = {"fp_accuracy": 0.9, "dptq_accuracy": 0.855, "drop": 4.5, "uniform_drop": 1.25,
           "random_drop": 10.0, "mean_bits": 4.0}  # fmt: skip
    table = evaluation.format_table({"kl": row, "ce": {**row, "drop": 0.0}}).splitlines()
    assert table[0] == ("| pair | FP acc | DPTQ acc | drop (pts) | uniform drop | random drop "
                        "| mean bits |")  # fmt: skip
    assert table[1] == "|---|---|---|---|---|---|---|"
    assert table[2] == "| kl | 90.00% | 85.50% | 4.50 | 1.25 | 10.00 | 4.000 |"
    assert table[3].startswith("| ce | 90.00% | 85.50% | 0.00 |") and len(table) == 4
