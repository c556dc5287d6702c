"""Supervised training on labels (used for the stage-A teacher): ``train_and_evaluate``.

The trainer does I/O and the loop only: the step functions come from
:mod:`ptq_adversary.steps`. Everything a run writes lives in its workdir::

    DIR/config.json        the config the run was started with (resume checks it)
    DIR/checkpoints/<step> orbax checkpoints (latest kept; resumed automatically)
    DIR/metrics.jsonl      one JSON record per log/eval step (see ptq_adversary.metrics)
    DIR/tensorboard/       TensorBoard events, when tensorboardX is installed
    DIR/results.json       the final evaluation (schema in README.md), written atomically

A run is a pure function of its config: the batch of step ``s`` depends only on
``(seed, s)``, so a run that is killed and restarted with the same command ends with the same
parameters as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ptq_adversary import config_lib, data, metrics, models, steps
from ptq_adversary.checkpoint import Checkpointer

__all__ = ["train_and_evaluate", "make_optimizer", "make_schedule", "evaluate", "build_model"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ pieces
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


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset) -> nnx.Module:
    """The registry model of ``config.model`` sized for ``dataset``."""
    return models.create_model(
        config.model.name,
        num_classes=dataset.num_classes,
        in_channels=dataset.image_shape[-1],
        weight_bits=config.model.weight_bits,
        rngs=nnx.Rngs(config.seed),
        **config_lib.to_dict(config.model.kwargs),
    )


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
    for batch in data.eval_batches(split, batch_size=batch_size, dataset_stats=dataset):
        arrays = (batch.images, batch.labels, batch.mask)
        if data_sharding is not None:
            arrays = jax.device_put(arrays, data_sharding)
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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config_lib.compare_with_saved(config, json.load(f))
    metrics.write_json_atomic(path, config_lib.to_dict(config))


def _window_meta(step: int, sums: dict[str, jax.Array] | None, count: int) -> dict[str, Any]:
    return {"step": step, "window_count": count,
            "window_sums": metrics.to_host(sums) if sums else {}}  # fmt: skip


def _window_from_meta(meta: dict[str, Any]) -> tuple[dict[str, jax.Array] | None, int]:
    count = int(meta.get("window_count", 0))
    if not count:
        return None, 0
    sums = {k: jnp.asarray(v, jnp.float32) for k, v in meta["window_sums"].items()}
    return sums, count


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
    workdir = os.path.abspath(workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    _prepare_workdir(config, workdir)

    dataset = data.load_dataset(
        config.data.name,
        data_dir=config.data.data_dir,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )
    optim = config.optim
    spe = data.steps_per_epoch(len(dataset.train), optim.batch_size)
    total_steps = optim.num_steps or max(1, int(round(optim.num_epochs * spe)))

    model = build_model(config, dataset)
    graphdef, params, rest = models.split_model(model)
    num_sites = model.num_sites
    optimizer = make_optimizer(optim, total_steps)
    schedule = make_schedule(optim, total_steps)
    state = steps.create_train_state(params, rest, optimizer, config.seed)

    # Data parallel over every device: batch sharded on 'data', state replicated. The same
    # code runs on 1 CPU or many accelerators.
    # Auto axes: XLA propagates shardings, so vmapping policies into the batch needs no
    # explicit out_sharding annotations.
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, replicated)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.ckpt.max_to_keep,
    )
    start_step, sums, count = 0, None, 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start_step = int(state.step)
        # The partial logging window travels in the checkpoint, so a resumed run logs the
        # same averages as an uninterrupted one.
        sums, count = _window_from_meta(meta)
        log.info("Resumed from %s at step %d", ckpt.directory, start_step)
    writer = metrics.MetricWriter(
        workdir, resume_step=start_step if start_step else None, tensorboard=config.log.tensorboard
    )

    train_step = jax.jit(
        steps.make_supervised_train_step(
            graphdef, optimizer, label_smoothing=optim.label_smoothing
        ),
        donate_argnums=0,
    )
    eval_step = jax.jit(steps.make_eval_step(graphdef))
    uniform = tuple(config.eval.uniform_bits)

    def run_eval(split: data.Split) -> dict[str, float]:
        return evaluate(
            eval_step, state.params, state.rest, split, dataset,
            batch_size=config.eval.batch_size, num_sites=num_sites,
            uniform_bits=uniform, data_sharding=data_sharding,
        )  # fmt: skip

    log.info(
        "%s on %s: %d params, %d sites, %d steps (%d per epoch), start at %d",
        config.model.name, config.data.name, models.count_params(params), num_sites,
        total_steps, spe, start_step,
    )  # fmt: skip
    t0 = time.perf_counter()
    bar = metrics.progress_bar(
        total_steps, initial=start_step, desc=f"train {config.model.name}",
        disable=not config.log.progress,
    )  # fmt: skip
    try:
        with _Preemption() as preemption:
            for step in range(start_step, total_steps):
                batch = data.train_batch(
                    dataset.train, step, batch_size=optim.batch_size, seed=config.seed,
                    augment=config.data.augment, dataset_stats=dataset, flip=config.data.flip,
                )  # fmt: skip
                images, labels = jax.device_put((batch.images, batch.labels), data_sharding)
                state, step_metrics = train_step(state, images, labels)
                sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
                count += 1
                done = step + 1
                bar.update(1)
                if done % config.log.every_steps == 0 or done == total_steps:
                    host = {k: v / count for k, v in metrics.to_host(sums).items()}
                    host["learning_rate"] = float(schedule(done - 1))
                    writer.write(done, host, split="train")
                    bar.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['accuracy']:.3f}")
                    sums, count = None, 0
                if done % config.eval.every_steps == 0 and done < total_steps:
                    writer.write(done, run_eval(dataset.val), split="val")
                if done % config.ckpt.every_steps == 0 or preemption.requested:
                    ckpt.save(done, state, _window_meta(done, sums, count))
                if preemption.requested:
                    ckpt.wait()
                    raise SystemExit(
                        f"SIGTERM: saved a checkpoint at step {done}; rerun the same command "
                        "to resume"
                    )
        bar.close()
        train_time = time.perf_counter() - t0
        ckpt.save(total_steps, state, _window_meta(total_steps, None, 0))

        val = run_eval(dataset.val)
        test = run_eval(dataset.test)
        writer.write(total_steps, val, split="val")
        writer.write(total_steps, test, split="test")
    finally:
        bar.close()
        writer.close()
        ckpt.close()

    results = {
        "trainer": "supervised",
        "model": config.model.name,
        "dataset": config.data.name,
        "num_params": models.count_params(state.params),
        "num_sites": num_sites,
        "site_names": list(model.site_names),
        "weight_bits": config.model.weight_bits,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "train_time_s": round(train_time, 2),
        "devices": [str(d) for d in jax.devices()],
        "val": val,
        "test": test,
        "num_examples": {"train": len(dataset.train), "val": len(dataset.val),
                         "test": len(dataset.test)},
    }  # fmt: skip
    metrics.write_json_atomic(os.path.join(workdir, "results.json"), results)
    log.info("test accuracy %.4f (FP); results in %s", test["accuracy"], workdir)
    return results
