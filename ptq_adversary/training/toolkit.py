"""The trainers' toolkit: data, model, optimizer, evaluation and one network-training skeleton.

What the trainers share: :func:`load_data`, :func:`model_spec` / :func:`build_model`,
:func:`num_train_steps`, :func:`make_schedule` / :func:`make_optimizer`, :func:`evaluate`
(full-precision and uniform-bit accuracy over a split) and :func:`train_network`, the one
skeleton of the supervised and distill trainers: they pass it only what differs, their step
function and their batches. The loop under it (resume, logging, checkpoints, preemption) is
:mod:`ptq_adversary.training.loop`.
"""

from __future__ import annotations

import dataclasses
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

from ptq_adversary import artifacts, data, distributed, models, steps
from ptq_adversary import config as config_lib
from ptq_adversary.training import loop

__all__ = [
    "BatchFn",
    "TrainedNetwork",
    "build_model",
    "evaluate",
    "load_data",
    "make_optimizer",
    "make_schedule",
    "model_spec",
    "num_train_steps",
    "train_network",
]

log = logging.getLogger(__name__)

#: ``step -> tuple of host arrays`` with a leading batch axis: a pure function of the step.
BatchFn = Callable[[int], tuple[np.ndarray, ...]]


# ------------------------------------------------------------------------------------ pieces
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
    ``optim.momentum`` (Nesterov) is read by ``sgd`` only.
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


# ------------------------------------------------------------------------------------ skeleton
@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
    """What :func:`train_network` returns.

    Attributes:
      workdir: the absolute run directory.
      dataset: the data the network was trained and evaluated on.
      summary: the results.json entries every network-training trainer reports (trainer,
        model, dataset, parameter and site counts, steps, resumed step, training time).
      val, test: the final :func:`evaluate` of each split.
    """

    workdir: str
    dataset: data.Dataset
    summary: dict[str, Any]
    val: dict[str, float]
    test: dict[str, float]


def train_network(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    trainer: str,
    desc: str,
    make_step: Callable[[nnx.GraphDef, optax.GradientTransformation], Callable[..., Any]],
    make_batches: Callable[[loop.Run, data.Dataset], BatchFn],
) -> TrainedNetwork:
    """Trains ``config.model`` on ``config.data`` with ``make_step``'s step; evaluates it.

    Resumes from the latest checkpoint in ``workdir`` if there is one; evaluates on the
    validation split every ``config.eval.every_steps`` and on both splits at the end (logged
    to the metrics), and writes the model artifact to ``workdir/model/``.

    Args:
      config: a validated network-training config (``model``, ``optim``, ``eval``, ...).
      workdir: the run directory (created if missing).
      trainer: the trainer's name, for the summary.
      desc: progress-bar label.
      make_step: ``(graphdef, optimizer) -> train_step(state, *batch) -> (state, metrics)``
        over a ``steps.TrainState``; jitted here, the state donated.
      make_batches: ``(run, dataset) -> batch_fn``, called once the dataset is loaded (so it
        may compute and cache what its batches need in ``run.workdir``).

    Returns:
      The run's :class:`TrainedNetwork`.
    """
    with loop.Run(config, workdir) as run:
        dataset = load_data(config)
        batch_fn = make_batches(run, dataset)
        optim = config.optim
        total_steps = num_train_steps(optim, len(dataset.train))

        model = build_model(config, dataset)
        graphdef, params, rest = models.split_model(model)
        optimizer = make_optimizer(optim, total_steps)
        state = run.restore_or_init(steps.create_train_state(params, rest, optimizer, config.seed))
        train_step = jax.jit(make_step(graphdef, optimizer), donate_argnums=0)
        eval_step = jax.jit(steps.make_eval_step(graphdef))

        def run_eval(state: steps.TrainState, split: data.Split) -> dict[str, float]:
            return evaluate(
                eval_step, state.params, state.rest, split, dataset,
                batch_size=config.eval.batch_size, num_sites=model.num_sites,
                uniform_bits=tuple(config.eval.uniform_bits), data_sharding=run.data_sharding,
            )  # fmt: skip

        log.info(
            "%s on %s: %d params, %d sites, %d steps (%d per epoch), start at %d",
            config.model.name, config.data.name, models.count_params(params),
            model.num_sites, total_steps,
            data.steps_per_epoch(len(dataset.train), optim.batch_size), run.start_step,
        )  # fmt: skip
        state = run.fit(
            state, train_step, batch_fn, total_steps=total_steps, desc=desc,
            eval_fn=lambda state, step: run_eval(state, dataset.val),
            learning_rate=make_schedule(optim, total_steps),
        )  # fmt: skip
        val = run_eval(state, dataset.val)
        test = run_eval(state, dataset.test)
        run.write(total_steps, val, split="val")
        run.write(total_steps, test, split="test")
        artifacts.save_model(
            os.path.join(run.workdir, "model"), model_spec(config, dataset), state.params,
            state.rest,
        )  # fmt: skip

    summary = {
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
    return TrainedNetwork(run.workdir, dataset, summary, val, test)
