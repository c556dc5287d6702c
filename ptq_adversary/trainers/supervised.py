"""Supervised training on labels (used for the stage-A teacher): ``train_and_evaluate``.

The step functions come from :mod:`ptq_adversary.steps`, the loop (resume, logging,
checkpoints, preemption) from :mod:`ptq_adversary.trainers.loop`. Besides the loop's files the
run writes ``DIR/results.json``, the final evaluation (schema in README.md), atomically, and
``DIR/model/``, the trained model as an artifact (:mod:`ptq_adversary.artifacts`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from ptq_adversary import artifacts, config_lib, data, distributed, io, models, steps
from ptq_adversary.trainers import loop

__all__ = [
    "train_and_evaluate",
    "make_optimizer",
    "make_schedule",
    "num_train_steps",
    "evaluate",
    "build_model",
    "model_spec",
    "load_data",
    "finish",
    "summary",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ pieces
def num_train_steps(optim: ml_collections.ConfigDict, num_examples: int) -> int:
    """``optim.num_steps`` if set, else ``optim.num_epochs`` epochs of full batches."""
    epoch = data.steps_per_epoch(num_examples, optim.batch_size)
    return optim.num_steps or max(1, int(round(optim.num_epochs * epoch)))


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ``optim.warmup_fraction`` of the steps, then cosine decay to 0."""
    warmup = int(round(optim.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """The optax optimizer of ``config.optim`` with :func:`make_schedule`'s learning rate.

    Weight decay is decoupled and skips 1-D parameters (biases, BatchNorm scales and offsets).
    """
    schedule = make_schedule(optim, total_steps)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    if optim.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask)
    else:  # "sgd", validated
        opt = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=optim.momentum, nesterov=True),
        )
    if optim.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
    return opt


def model_spec(config: ml_collections.ConfigDict, dataset: data.Dataset) -> artifacts.ModelSpec:
    """The architecture of ``config.model`` sized for ``dataset``."""
    return artifacts.ModelSpec(
        name=config.model.name,
        num_classes=dataset.num_classes,
        in_channels=dataset.image_shape[-1],
        weight_bits=config.model.weight_bits,
        kwargs=config_lib.to_dict(config.model.kwargs),
        image_size=tuple(dataset.image_shape[:2]),
        factory=config.model.get("factory") or None,
    )


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset) -> nnx.Module:
    """The registry model of ``config.model`` sized for ``dataset``, seeded by ``config.seed``."""
    return artifacts.build(model_spec(config, dataset), config.seed)


def evaluate(
    eval_step,
    params: nnx.State,
    rest: nnx.State,
    split: data.Split,
    dataset: data.Dataset,
    *,
    batch_size: int,
    num_sites: int,
    uniform_bits: tuple[int, ...],
    data_sharding: NamedSharding | None = None,
) -> dict[str, float]:
    """Full-precision and uniform-bit DPTQ accuracy/loss over a whole split.

    Returns:
      ``{"accuracy": ..., "loss": ..., "accuracy_uniform_<b>": ..., "loss_uniform_<b>": ...}``
      with accuracy in [0, 1] and mean cross-entropy, every example counted once.
    """
    bits = steps.uniform_bits(uniform_bits, batch_size, num_sites)
    totals = None
    for arrays in distributed.eval_arrays(
        split, batch_size=batch_size, dataset_stats=dataset, sharding=data_sharding
    ):
        out = eval_step(params, rest, *arrays, bits)
        # Summed on device; a single transfer at the end keeps the loop asynchronous.
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    result = {
        "accuracy": float(totals["fp_correct"]) / count,
        "loss": float(totals["fp_loss"]) / count,
    }
    for i, b in enumerate(uniform_bits):
        result[f"accuracy_uniform_{b}"] = float(totals["q_correct"][i]) / count
        result[f"loss_uniform_{b}"] = float(totals["q_loss"][i]) / count
    return result


# ------------------------------------------------------------------------------------ trainer
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.data`` with labels, evaluates, writes results.json.

    Resumes from the latest checkpoint in ``workdir`` if there is one.

    Args:
      config: a supervised config (see ``configs/fmnist_cnn.py``); validated here.
      workdir: the run directory (created if missing).

    Returns:
      The results dict also written to ``workdir/results.json``.
    """
    config_lib.validate(config, num_devices=jax.device_count())
    with loop.Run(config, workdir) as run:
        dataset = load_data(config)
        optim = config.optim
        total_steps = num_train_steps(optim, len(dataset.train))

        model = build_model(config, dataset)
        graphdef, params, rest = models.split_model(model)
        optimizer = make_optimizer(optim, total_steps)
        state = run.restore_or_init(steps.create_train_state(params, rest, optimizer, config.seed))
        train_step = jax.jit(
            steps.make_supervised_train_step(
                graphdef, optimizer, label_smoothing=optim.label_smoothing
            ),
            donate_argnums=0,
        )
        eval_step = jax.jit(steps.make_eval_step(graphdef))

        def run_eval(state: steps.TrainState, split: data.Split) -> dict[str, float]:
            return evaluate(
                eval_step, state.params, state.rest, split, dataset,
                batch_size=config.eval.batch_size, num_sites=model.num_sites,
                uniform_bits=tuple(config.eval.uniform_bits), data_sharding=run.data_sharding,
            )  # fmt: skip

        def batch_fn(step: int) -> tuple[np.ndarray, np.ndarray]:
            batch = data.train_batch(
                dataset.train, step, batch_size=optim.batch_size, seed=config.seed,
                augment=config.data.augment, dataset_stats=dataset, flip=config.data.flip,
                shard=distributed.process_shard(),
            )  # fmt: skip
            return batch.images, batch.labels

        log.info(
            "%s on %s: %d params, %d sites, %d steps (%d per epoch), start at %d",
            config.model.name, config.data.name, models.count_params(params),
            model.num_sites, total_steps,
            data.steps_per_epoch(len(dataset.train), optim.batch_size), run.start_step,
        )  # fmt: skip
        state = run.fit(
            state, train_step, batch_fn, total_steps=total_steps,
            desc=f"train {config.model.name}",
            eval_fn=lambda state, step: run_eval(state, dataset.val),
            learning_rate=make_schedule(optim, total_steps),
        )  # fmt: skip
        val, test = finish(run, state, run_eval, dataset, model_spec(config, dataset), total_steps)

    results = {
        **summary("supervised", config, model, state, run, total_steps),
        "devices": [str(d) for d in jax.devices()],
        "val": val,
        "test": test,
        "num_examples": {"train": len(dataset.train), "val": len(dataset.val),
                         "test": len(dataset.test)},
    }  # fmt: skip
    io.write_json_atomic(os.path.join(run.workdir, "results.json"), results)
    log.info("test accuracy %.4f (FP); results in %s", test["accuracy"], run.workdir)
    return results


def summary(
    trainer: str,
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    state: steps.TrainState,
    run: loop.Run,
    total_steps: int,
) -> dict[str, Any]:
    """The results.json entries every network-training stage reports."""
    return {
        "trainer": trainer,
        "model": config.model.name,
        "dataset": config.data.name,
        "num_params": models.count_params(state.params),
        "num_sites": model.num_sites,
        "site_names": list(model.site_names),
        "weight_bits": config.model.weight_bits,
        "steps": total_steps,
        "resumed_from_step": run.start_step,
        "train_time_s": round(run.train_time_s, 2),
    }


def finish(
    run: loop.Run,
    state: steps.TrainState,
    run_eval: Callable[[steps.TrainState, data.Split], dict[str, float]],
    dataset: data.Dataset,
    spec: artifacts.ModelSpec,
    total_steps: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Final validation and test evaluation, logged, and the model written as an artifact."""
    val = run_eval(state, dataset.val)
    test = run_eval(state, dataset.test)
    run.write(total_steps, val, split="val")
    run.write(total_steps, test, split="test")
    artifacts.save_model(os.path.join(run.workdir, "model"), spec, state.params, state.rest)
    return val, test


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    """The dataset of ``config.data``."""
    return data.load_dataset(
        config.data.name,
        data_dir=config.data.data_dir,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )
