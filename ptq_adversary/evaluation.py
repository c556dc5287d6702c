"""Stage C: evaluate a network/policy pair under DPTQ against reference allocations.

For a pair (f, pi) and a split: FP accuracy; DPTQ accuracy with the policy's greedy allocation
(deployment); the drop in points; the mean bits used (equal to the budget by construction);
and the same drop for two reference allocations at the same budget on the same network:
the uniform allocation and allocations drawn uniformly from all feasible ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ptq_adversary import artifacts, data, distributed, steps

__all__ = ["evaluate_pair", "format_table"]


def evaluate_pair(
    model: artifacts.LoadedModel,
    pol: artifacts.LoadedPolicy,
    split: data.Split,
    dataset: data.Dataset,
    *,
    batch_size: int,
    num_random: int = 4,
    seed: int = 0,
    eval_step=None,
    data_sharding: NamedSharding | None = None,
) -> dict[str, Any]:
    """Stage-C metrics of one pair on one split.

    Args:
      model, pol: the network and its policy (artifacts or the live state of a run, wrapped).
      split: the examples; dataset: its normalisation statistics.
      batch_size: evaluation batch size.
      num_random: random feasible allocations per input for the random reference.
      seed: seeds the random allocations (same draws for every pair with the same seed).
      eval_step: a jitted :func:`steps.make_pair_eval_step` to reuse (built if None).
      data_sharding: where to put batches (default: the default device).

    Returns:
      accuracies in [0, 1] and drops in points (``100 * (fp - dptq)``): ``fp_accuracy``,
      ``dptq_accuracy``, ``drop``, ``uniform_accuracy``, ``uniform_drop``,
      ``random_accuracy``, ``random_drop``, ``flip_rate`` (FP-correct inputs that DPTQ gets
      wrong, over all inputs), ``mean_bits``, ``budget``, and ``site_bit_histogram``
      (``[L][K]`` fractions of inputs giving site l choice k) with ``choices`` and
      ``site_names``.
    """
    budget = pol.spec.budget_spec
    if eval_step is None:
        eval_step = jax.jit(
            steps.make_pair_eval_step(model.graphdef, pol.graphdef, budget, num_random=num_random)
        )
    weights = (model.params, model.rest, pol.params, pol.rest)
    if data_sharding is not None:  # batches are sharded: replicate the weights on the same mesh
        weights = distributed.replicate(weights, NamedSharding(data_sharding.mesh, PartitionSpec()))
    key = jax.random.PRNGKey(seed)
    totals = None
    batches = distributed.eval_arrays(
        split, batch_size=batch_size, dataset_stats=dataset, sharding=data_sharding
    )
    for i, arrays in enumerate(batches):
        out = eval_step(*weights, *arrays, jax.random.fold_in(key, i))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    fp = float(totals["fp_correct"]) / n
    dptq = float(totals["greedy_correct"]) / n
    uniform = float(totals["uniform_correct"]) / n
    random = float(totals["random_correct"]) / (n * num_random)
    hist = np.asarray(totals["greedy_hist"], np.float64) / n
    return {
        "fp_accuracy": fp,
        "dptq_accuracy": dptq,
        "drop": 100.0 * (fp - dptq),
        "uniform_accuracy": uniform,
        "uniform_drop": 100.0 * (fp - uniform),
        "random_accuracy": random,
        "random_drop": 100.0 * (fp - random),
        "flip_rate": float(totals["greedy_flips"]) / n,
        "mean_bits": float(totals["greedy_bits"]) / n,
        "budget": budget.budget,
        "num_examples": int(n),
        "choices": list(budget.choices),
        "site_names": list(model.site_names),
        "site_bit_histogram": hist.round(6).tolist(),
    }


_COLUMNS = (
    ("pair", "{}"),
    ("FP acc", "{:.2%}"),
    ("DPTQ acc", "{:.2%}"),
    ("drop (pts)", "{:.2f}"),
    ("uniform drop", "{:.2f}"),
    ("random drop", "{:.2f}"),
    ("mean bits", "{:.3f}"),
)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of stage-C results, one row per pair (``{name: evaluate_pair(...)}``)."""
    keys = ("fp_accuracy", "dptq_accuracy", "drop", "uniform_drop", "random_drop", "mean_bits")
    lines = [
        "| " + " | ".join(name for name, _ in _COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    for pair, r in rows.items():
        cells = [pair] + [fmt.format(r[k]) for k, (_, fmt) in zip(keys, _COLUMNS[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
