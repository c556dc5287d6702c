"""Supervised training on labels (used for the stage-A teacher): ``train_and_evaluate``.

The skeleton (data, model, optimizer, evaluation, the model artifact) is
:func:`ptq_adversary.training.toolkit.train_network`; this trainer gives it the
label step (:func:`steps.make_supervised_train_step`) and augmented batches. Besides the loop's
files (:mod:`ptq_adversary.training.loop`) the run writes ``DIR/results.json``, the final
evaluation (schema in docs/OUTPUTS.md), atomically, and ``DIR/model/``, the trained model as an
artifact (:mod:`ptq_adversary.artifacts`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections

from ptq_adversary import config as config_lib
from ptq_adversary import data, distributed, io, steps
from ptq_adversary.training import checks, loop, toolkit

__all__ = ["RULES", "train_and_evaluate"]

log = logging.getLogger(__name__)

#: The fields a supervised config must get right (then :data:`checks.NETWORK_CHECKS`).
RULES = (
    *config_lib.common_rules(),
    *config_lib.model_rules(),
    *config_lib.optim_rules(),
    config_lib.Rule("optim.label_smoothing", config_lib.fraction),
    config_lib.Rule("eval.uniform_bits", config_lib.bit_list),
)


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
    optim = config.optim

    def make_batches(run: loop.Run, dataset: data.Dataset) -> toolkit.BatchFn:
        def batch_fn(step: int):
            batch = data.train_batch(
                dataset.train, step, batch_size=optim.batch_size, seed=config.seed,
                augment=config.data.augment, dataset_stats=dataset, flip=config.data.flip,
                shard=distributed.process_shard(),
            )  # fmt: skip
            return batch.images, batch.labels

        return batch_fn

    trained = toolkit.train_network(
        config, workdir, trainer="supervised", desc=f"train {config.model.name}",
        make_step=lambda graphdef, optimizer: steps.make_supervised_train_step(
            graphdef, optimizer, label_smoothing=optim.label_smoothing),
        make_batches=make_batches,
    )  # fmt: skip
    dataset = trained.dataset
    results = {
        **trained.summary,
        "devices": [str(d) for d in jax.devices()],
        "val": trained.val,
        "test": trained.test,
        "num_examples": {"train": len(dataset.train), "val": len(dataset.val),
                         "test": len(dataset.test)},
    }  # fmt: skip
    io.write_json_atomic(os.path.join(trained.workdir, "results.json"), results)
    log.info("test accuracy %.4f (FP); results in %s", trained.test["accuracy"], trained.workdir)
    return results


config_lib.register("supervised", RULES, checks=checks.NETWORK_CHECKS)
