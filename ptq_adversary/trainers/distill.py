"""Stage A: distil a black-box teacher into a white-box student (``train_and_evaluate``).

The teacher is used only through its logits: any callable ``images [B,H,W,C] -> logits [B,C]``
(by default the model artifact at ``config.teacher.model_dir``). Its logits on the training
split are computed once and cached in the workdir, per example index, so the student's training
never calls the teacher again and the teacher is never checkpointed by this run: ``teacher.json``
records where its logits came from.

Writes, besides the loop's files (:mod:`ptq_adversary.trainers.loop`)::

    DIR/teacher_logits.npy  float32 [N_train, C], row i = teacher logits of train example i
    DIR/teacher.json        the teacher's source and its accuracy on the splits
    DIR/model/              the student artifact (:mod:`ptq_adversary.artifacts`)
    DIR/results.json        student FP / uniform-bit accuracy, teacher agreement
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ptq_adversary import artifacts, config_lib, data, distributed, io, models, steps
from ptq_adversary.trainers import loop, supervised

__all__ = ["train_and_evaluate", "teacher_from_artifact", "predict_logits"]

log = logging.getLogger(__name__)

TeacherFn = Callable[[np.ndarray], np.ndarray]


def teacher_from_artifact(model_dir: str) -> TeacherFn:
    """A black-box teacher: FP logits of the model artifact at ``model_dir``."""
    teacher = artifacts.load_model(model_dir)

    @jax.jit
    def logits_fn(images):
        return models.apply_model(teacher.graphdef, teacher.params, teacher.rest, images)[0]

    return lambda images: np.asarray(logits_fn(images))


def predict_logits(fn: TeacherFn, split: data.Split, dataset: data.Dataset, *,
                   batch_size: int) -> np.ndarray:  # fmt: skip
    """``fn``'s logits on every example of ``split`` in order: float32 ``[N, C]``."""
    out = []
    for batch in data.eval_batches(split, batch_size=batch_size, dataset_stats=dataset):
        logits = np.asarray(fn(batch.images), np.float32)
        out.append(logits[batch.mask > 0])
    return np.concatenate(out)


def _cached_teacher_logits(workdir: str, fn: TeacherFn, source: str, dataset: data.Dataset,
                           batch_size: int) -> np.ndarray:  # fmt: skip
    path = os.path.join(workdir, "teacher_logits.npy")
    if os.path.exists(path):
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(dataset.train), dataset.num_classes):
            return cached
        log.warning("Ignoring %s of shape %s (another data slice)", path, cached.shape)
    logits = predict_logits(fn, dataset.train, dataset, batch_size=batch_size)
    tmp = f"{path}.tmp.npy"
    np.save(tmp, logits, allow_pickle=False)
    os.replace(tmp, path)

    def acc(split):
        predictions = predict_logits(fn, split, dataset, batch_size=batch_size).argmax(-1)
        return float(np.mean(predictions == split.labels))

    info = {
        "source": source,
        "accuracy": {"train": float(np.mean(logits.argmax(-1) == dataset.train.labels)),
                     "val": acc(dataset.val), "test": acc(dataset.test)},
    }  # fmt: skip
    io.write_json_atomic(os.path.join(workdir, "teacher.json"), info)
    return logits


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, teacher_fn: TeacherFn | None = None
) -> dict[str, Any]:
    """Distils the teacher into ``config.model``; evaluates; writes results.json and the model.

    Args:
      config: a distill config (``trainer='distill'``; see ``configs/fmnist_pair.py``).
      workdir: the run directory; resumed if it holds checkpoints.
      teacher_fn: a black-box teacher; default: the artifact at ``config.teacher.model_dir``.

    Returns:
      The results dict written to ``workdir/results.json``.
    """
    config_lib.validate(config, num_devices=jax.device_count())
    source = "callable" if teacher_fn is not None else os.path.abspath(config.teacher.model_dir)
    with loop.Run(config, workdir) as run:
        dataset = supervised.load_data(config)
        if teacher_fn is None:
            teacher_fn = teacher_from_artifact(config.teacher.model_dir)
        teacher_logits = _cached_teacher_logits(
            run.workdir, teacher_fn, source, dataset, config.eval.batch_size
        )
        del teacher_fn  # black box: only its cached outputs are used from here on

        optim = config.optim
        total_steps = supervised.num_train_steps(optim, len(dataset.train))
        model = supervised.build_model(config, dataset)
        graphdef, params, rest = models.split_model(model)
        optimizer = supervised.make_optimizer(optim, total_steps)
        state = run.restore_or_init(steps.create_train_state(params, rest, optimizer, config.seed))
        train_step = jax.jit(
            steps.make_distill_train_step(
                graphdef, optimizer, temperature=config.kd.temperature,
                label_weight=config.kd.label_weight,
            ),
            donate_argnums=0,
        )  # fmt: skip
        eval_step = jax.jit(steps.make_eval_step(graphdef))

        def run_eval(state: steps.TrainState, split: data.Split) -> dict[str, float]:
            return supervised.evaluate(
                eval_step, state.params, state.rest, split, dataset,
                batch_size=config.eval.batch_size, num_sites=model.num_sites,
                uniform_bits=tuple(config.eval.uniform_bits), data_sharding=run.data_sharding,
            )  # fmt: skip

        def batch_fn(step: int) -> tuple[np.ndarray, ...]:
            # No augmentation: the cached teacher logits belong to the un-augmented images.
            batch = data.train_batch(
                dataset.train, step, batch_size=optim.batch_size, seed=config.seed,
                dataset_stats=dataset, shard=distributed.process_shard(),
            )  # fmt: skip
            return batch.images, batch.labels, teacher_logits[batch.indices]

        state = run.fit(
            state, train_step, batch_fn, total_steps=total_steps,
            desc=f"stage A: distil into {config.model.name}",
            eval_fn=lambda state, step: run_eval(state, dataset.val),
            learning_rate=supervised.make_schedule(optim, total_steps),
        )  # fmt: skip
        val, test = supervised.finish(
            run, state, run_eval, dataset, supervised.model_spec(config, dataset), total_steps
        )

    with open(os.path.join(run.workdir, "teacher.json"), encoding="utf-8") as f:
        teacher_info = json.load(f)
    results = {
        **supervised.summary("distill", config, model, state, run, total_steps),
        "teacher": teacher_info,
        "val": val,
        "test": test,
    }
    io.write_json_atomic(os.path.join(run.workdir, "results.json"), results)
    log.info(
        "student test accuracy %.4f (teacher %.4f)",
        test["accuracy"], teacher_info["accuracy"]["test"],
    )  # fmt: skip
    return results
