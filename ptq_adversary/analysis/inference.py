"""Loading a pipeline's pairs and running them: FP logits, greedy-DPTQ logits, allocations.

A pair is the selected network and policy of one mode of a pipeline workdir
(``DIR/<mode>/best/{model,policy}``). :func:`pair_forward` is the jitted forward of one batch
(compiled once per architecture and batch shape); :func:`predict_pair` runs it over a whole
array of images with fixed-size padded batches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import artifacts, data, io, models, policy

__all__ = ["load_pair", "load_run_dataset", "pair_forward", "predict_pair"]


def load_pair(run_dir: str, mode: str) -> tuple[artifacts.LoadedModel, artifacts.LoadedPolicy]:
    """The selected network and policy of pair ``mode`` in pipeline workdir ``run_dir``.

    Reads ``run_dir/<mode>/best/model`` and ``run_dir/<mode>/best/policy`` (written by
    ``training.policy_aware``).
    """
    best = os.path.join(run_dir, mode, "best")
    return (
        artifacts.load_model(os.path.join(best, "model")),
        artifacts.load_policy(os.path.join(best, "policy")),
    )


def load_run_dataset(run_dir: str) -> data.Dataset:
    """The dataset a pipeline workdir was trained and evaluated on (its ``config.json``)."""
    cfg = io.read_json(os.path.join(run_dir, "config.json"))["data"]
    return data.load_dataset(
        cfg["name"],
        data_dir=cfg.get("data_dir"),
        val_size=cfg["val_size"],
        split_seed=cfg["split_seed"],
        train_limit=cfg.get("train_limit"),
        test_limit=cfg.get("test_limit"),
    )


# ------------------------------------------------------------------------------- forward
@functools.partial(jax.jit, static_argnames=("graphdef", "policy_graphdef", "budget"))
def pair_forward(
    params: nnx.State,
    rest: nnx.State,
    policy_params: nnx.State,
    policy_rest: nnx.State,
    images: ArrayLike,
    *,
    graphdef: nnx.GraphDef,
    policy_graphdef: nnx.GraphDef,
    budget: policy.Budget,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FP logits, greedy-DPTQ logits and the greedy allocation of a pair on one batch.

    Args:
      params, rest: the network's state; policy_params, policy_rest: the policy's.
      images: float32 ``[B, H, W, C]``, normalised.
      graphdef, policy_graphdef, budget: static structure (one compile per architecture).

    Returns:
      ``fp_logits [B, C]``, ``q_logits [B, C]`` (at the policy's greedy allocation) and
      int32 ``bit_idx [B, L]`` (indices into ``budget.choices``).
    """
    fp_logits, _ = models.apply_model(graphdef, params, rest, images)
    bit_idx = policy.greedy_allocation(
        policy_graphdef, policy_params, policy_rest, images=images, budget=budget
    )
    q_logits, _ = models.apply_model(
        graphdef, params, rest, images, policy.to_bits(bit_idx, budget)
    )
    return fp_logits, q_logits, bit_idx


def predict_pair(
    model: artifacts.LoadedModel,
    pol: artifacts.LoadedPolicy,
    images: np.ndarray,
    *,
    batch_size: int = 1000,
    advance: Callable[[float], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-input outputs of a pair on normalised images.

    Args:
      model, pol: the pair.
      images: float32 ``[N, H, W, C]``, normalised like the training data.
      batch_size: fixed batch size (the last batch is padded, so one compile).
      advance: progress, called after each batch with the fraction of the ``N`` images done
        in it (the calls sum to 1).

    Returns:
      numpy ``fp_logits [N, C]``, ``q_logits [N, C]``, int32 ``bit_idx [N, L]``.
    """
    forward = functools.partial(
        pair_forward,
        graphdef=model.graphdef,
        policy_graphdef=pol.graphdef,
        budget=pol.spec.budget_spec,
    )
    outs: list[tuple[np.ndarray, ...]] = []
    for start, stop, pad in data.padded_batches(len(images), batch_size):
        batch = data.pad_rows(np.asarray(images[start:stop]), pad)
        out = forward(model.params, model.rest, pol.params, pol.rest, batch)
        outs.append(tuple(np.asarray(o)[: stop - start] for o in out))
        if advance is not None:
            advance((stop - start) / len(images))
    fp, q, idx = (np.concatenate(parts) for parts in zip(*outs, strict=True))
    return {"fp_logits": fp, "q_logits": q, "bit_idx": idx.astype(np.int32)}
