"""Stage A: distil a black-box teacher into a white-box student (``train_and_evaluate``).

The teacher is used only through its logits: any callable ``images [B,H,W,C] -> logits [B,C]``
(by default the model artifact at ``config.teacher.model_dir``). Its logits on the training
split are computed once and cached in the workdir, per example index, so the student's training
never calls the teacher again and the teacher is never checkpointed by this run: ``teacher.json``
records where its logits came from. The skeleton of the run is the supervised trainer's
(:func:`ptq_adversary.training.toolkit.train_network`) with the distillation step.

Writes, besides the loop's files (:mod:`ptq_adversary.training.loop`)::

    DIR/teacher_logits.npy  float32 [N_train, C], row i = teacher logits of train example i
    DIR/teacher.json        the teacher's source and its accuracy on the splits
    DIR/model/              the student artifact (:mod:`ptq_adversary.artifacts`)
    DIR/results.json        student FP / uniform-bit accuracy, teacher agreement
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ptq_adversary import artifacts, data, distributed, io, models, steps
from ptq_adversary import config as config_lib
from ptq_adversary.training import checks, loop, toolkit

__all__ = [
    "AUGMENT_REASON",
    "RULES",
    "TeacherFn",
    "predict_logits",
    "teacher_from_artifact",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

#: A black-box teacher: float32 images ``[B, H, W, C]`` -> logits ``[B, C]``.
TeacherFn = Callable[[np.ndarray], np.ndarray]

#: Why stages A and B train without augmentation (their batches index cached teacher logits).
AUGMENT_REASON = "teacher logits are cached on un-augmented images"

#: The fields a distill config must get right (then :data:`checks.NETWORK_CHECKS`).
RULES = (
    *config_lib.common_rules(),
    *config_lib.model_rules(),
    *config_lib.optim_rules(),
    config_lib.Rule("eval.uniform_bits", config_lib.bit_list),
    config_lib.Rule("kd.temperature", config_lib.positive(float)),
    config_lib.Rule("kd.label_weight", config_lib.non_negative),
    config_lib.Rule("teacher.model_dir", config_lib.non_empty_str),
    config_lib.Rule("data.augment", config_lib.must_be_false(AUGMENT_REASON)),
)


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
    """The teacher's logits on the train split, float32 ``[N_train, C]``: read from
    ``workdir/teacher_logits.npy`` if it holds this data slice's, else computed and written
    there (atomically) with ``teacher.json`` (``source`` and the teacher's accuracies)."""
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
    optim = config.optim

    def make_batches(run: loop.Run, dataset: data.Dataset) -> toolkit.BatchFn:
        teacher = teacher_fn if teacher_fn is not None else (
            teacher_from_artifact(config.teacher.model_dir))  # fmt: skip
        # Black box: only the teacher's cached outputs are used from here on.
        teacher_logits = _cached_teacher_logits(
            run.workdir, teacher, source, dataset, config.eval.batch_size
        )

        def batch_fn(step: int):
            # No augmentation: the cached teacher logits belong to the un-augmented images.
            batch = data.train_batch(
                dataset.train, step, batch_size=optim.batch_size, seed=config.seed,
                dataset_stats=dataset, shard=distributed.process_shard(),
            )  # fmt: skip
            return batch.images, batch.labels, teacher_logits[batch.indices]

        return batch_fn

    trained = toolkit.train_network(
        config, workdir, trainer="distill", desc=f"stage A: distil into {config.model.name}",
        make_step=lambda graphdef, optimizer: steps.make_distill_train_step(
            graphdef, optimizer, temperature=config.kd.temperature,
            label_weight=config.kd.label_weight),
        make_batches=make_batches,
    )  # fmt: skip
    teacher_info = io.read_json(os.path.join(trained.workdir, "teacher.json"))
    results = {**trained.summary, "teacher": teacher_info, "val": trained.val,
               "test": trained.test}  # fmt: skip
    io.write_json_atomic(os.path.join(trained.workdir, "results.json"), results)
    log.info(
        "student test accuracy %.4f (teacher %.4f)",
        trained.test["accuracy"], teacher_info["accuracy"]["test"],
    )  # fmt: skip
    return results


config_lib.register("distill", RULES, checks=checks.NETWORK_CHECKS)
