"""Stage B: policy-aware training of a robust or a detrimental network/policy pair.

Starts from the stage-A student (``config.student_dir``: its ``model/`` artifact and its cached
teacher logits) and trains the network with the quantizer in the loop while REINFORCE trains
the bit-width policy (:func:`steps.make_pair_train_step`). BatchNorm statistics stay frozen.

Matching: every ``eval.every_steps`` the pair is evaluated on the validation split. A state
counts only while its FP validation accuracy is within ``pair.fp_tolerance`` of the stage-A
student's; among those, the best for the mode (lowest greedy-DPTQ accuracy for
``detrimental``, highest for ``robust``) is kept in ``DIR/best/``. The student itself (step 0,
untrained policy) is the first candidate, so a matched pair always exists.

Writes, besides the loop's files::

    DIR/best/model/, DIR/best/policy/  the selected pair (artifacts)
    DIR/best/info.json                 its step and validation metrics
    DIR/results.json                   stage-C metrics of the selected pair on val and test
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from ptq_adversary import artifacts, data, distributed, evaluation, io, steps
from ptq_adversary import config as config_lib
from ptq_adversary.training import checks, distill, loop, toolkit

__all__ = ["RULES", "train_and_evaluate", "policy_spec"]

log = logging.getLogger(__name__)

_R = config_lib.Rule
#: The fields a policy-aware config must get right (then :data:`checks.NETWORK_CHECKS` and
#: :func:`checks.check_pair_budget`).
RULES = (
    *config_lib.common_rules(),
    *config_lib.model_rules(),
    *config_lib.optim_rules(),
    _R("mode", config_lib.one_of(steps.MODES)),
    _R("student_dir", config_lib.non_empty_str),
    _R("data.augment", config_lib.must_be_false(distill.AUGMENT_REASON)),
    _R("quant.choices", config_lib.bit_choices),
    _R("quant.budget", config_lib.positive(float)),
    _R("policy.widths", config_lib.positive_ints),
    _R("policy.learning_rate", config_lib.positive(float)),
    _R("pair.num_samples", config_lib.at_least(2, "leave-one-out baseline")),
    _R("pair.quant_batch", config_lib.positive(int), optional=True),
    _R("pair.temperature", config_lib.positive(float)),
    _R("pair.quant_weight", config_lib.non_negative),
    _R("pair.margin", config_lib.non_negative),
    _R("pair.reward", config_lib.one_of(steps.REWARDS)),
    _R("pair.entropy_coef", config_lib.non_negative),
    _R("pair.fp_tolerance", config_lib.fraction),
    _R("pair.num_random_eval", config_lib.positive(int)),
)


def policy_spec(config: ml_collections.ConfigDict, model: artifacts.LoadedModel,
                dataset: data.Dataset) -> artifacts.PolicySpec:  # fmt: skip
    """The policy architecture and budget of ``config`` for ``model``."""
    return artifacts.PolicySpec(
        num_sites=model.num_sites,
        in_channels=dataset.image_shape[-1],
        choices=tuple(config.quant.choices),
        budget=float(config.quant.budget),
        widths=tuple(config.policy.widths),
    )


def _policy_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(config.policy.learning_rate)


def _wrap(graphdef, params, rest, like):
    # Live state seen through the artifact interface, so stage C code serves both.
    return type(like)(**{**like.__dict__, "graphdef": graphdef, "params": params, "rest": rest})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains one pair (``config.mode``), selects the matched best, evaluates it (stage C).

    Args:
      config: a policy-aware config (``trainer='policy_aware'``; see configs/fmnist_pair.py).
      workdir: the run directory; resumed if it holds checkpoints.

    Returns:
      The results dict written to ``workdir/results.json``.
    """
    config_lib.validate(config, num_devices=jax.device_count())
    student_dir = os.path.abspath(config.student_dir)
    student_results = io.read_json(os.path.join(student_dir, "results.json"))
    with loop.Run(config, workdir) as run:
        dataset = toolkit.load_data(config)
        student = artifacts.load_model(os.path.join(student_dir, "model"))
        teacher_logits = np.load(os.path.join(student_dir, "teacher_logits.npy"))
        if teacher_logits.shape[0] != len(dataset.train):
            raise ValueError(
                f"{student_dir}/teacher_logits.npy has {teacher_logits.shape[0]} rows but the "
                f"train split has {len(dataset.train)}: the data config differs from stage A's"
            )
        pspec = policy_spec(config, student, dataset)
        budget = pspec.budget_spec
        pol_template = artifacts.LoadedPolicy(pspec, *nnx.split(
            artifacts.build_policy(pspec, config.seed), nnx.Param, ...))  # fmt: skip

        optim = config.optim
        total_steps = toolkit.num_train_steps(optim, len(dataset.train))
        optimizer = toolkit.make_optimizer(optim, total_steps)
        policy_optimizer = _policy_optimizer(config)
        state = run.restore_or_init(
            steps.create_pair_state(
                student.params, student.rest, optimizer,
                pol_template.params, pol_template.rest, policy_optimizer, config.seed,
            )
        )  # fmt: skip
        pc = config.pair
        train_step = jax.jit(
            steps.make_pair_train_step(
                student.graphdef, pol_template.graphdef, optimizer, policy_optimizer, budget,
                mode=config.mode, num_samples=pc.num_samples, temperature=pc.temperature,
                quant_weight=pc.quant_weight, margin=pc.margin, reward=pc.reward,
                entropy_coef=pc.entropy_coef, quant_batch=pc.quant_batch,
            ),
            donate_argnums=0,
        )  # fmt: skip
        eval_step = jax.jit(
            steps.make_pair_eval_step(
                student.graphdef, pol_template.graphdef, budget, num_random=pc.num_random_eval
            )
        )

        def stage_c(state: steps.PairState, split: data.Split) -> dict[str, Any]:
            return evaluation.evaluate_pair(
                _wrap(student.graphdef, state.params, state.rest, student),
                _wrap(pol_template.graphdef, state.policy_params, state.policy_rest,
                      pol_template),
                split, dataset, batch_size=config.eval.batch_size,
                num_random=pc.num_random_eval, seed=config.seed, eval_step=eval_step,
                data_sharding=run.data_sharding,
            )  # fmt: skip

        reference = student_results["val"]["accuracy"]
        best_dir = os.path.join(run.workdir, "best")
        sign = -1.0 if config.mode == "detrimental" else 1.0

        def select(state: steps.PairState, step: int) -> dict[str, float]:
            """Validation metrics; keeps the state in best/ if matched and better."""
            val = stage_c(state, dataset.val)
            gap = 100.0 * abs(val["fp_accuracy"] - reference)
            matched = gap <= 100.0 * pc.fp_tolerance
            score = sign * val["dptq_accuracy"]
            best = _read_best(best_dir)
            if matched and (best is None or score > best["score"]):
                host = jax.device_get(state)
                artifacts.save_model(os.path.join(best_dir, "model"), student.spec,
                                     host.params, host.rest)  # fmt: skip
                artifacts.save_policy(os.path.join(best_dir, "policy"), pspec,
                                      host.policy_params, host.policy_rest)  # fmt: skip
                io.write_json_atomic(
                    os.path.join(best_dir, "info.json"), {"step": step, "score": score, "val": val}
                )
            scalars = {k: v for k, v in val.items() if isinstance(v, float)}
            return {**scalars, "fp_gap_points": gap, "matched": float(matched)}

        if _read_best(best_dir) is None:  # the student itself is the first candidate
            run.write(0, select(state, 0), split="val")
        state = run.fit(
            state, train_step,
            lambda step: _batch(dataset, teacher_logits, step, optim.batch_size, config.seed),
            total_steps=total_steps, desc=f"stage B: {config.mode} pair",
            eval_fn=select, learning_rate=toolkit.make_schedule(optim, total_steps),
        )  # fmt: skip
        run.write(total_steps, select(state, total_steps), split="val")

        best_info = _read_best(best_dir)
        best_model = artifacts.load_model(os.path.join(best_dir, "model"))
        best_policy = artifacts.load_policy(os.path.join(best_dir, "policy"))
        results = {
            "trainer": "policy_aware",
            "mode": config.mode,
            "model": student.spec.name,
            "dataset": config.data.name,
            "student_dir": student_dir,
            "student_val_accuracy": reference,
            "student_test_accuracy": student_results["test"]["accuracy"],
            "best_step": best_info["step"],
            "steps": total_steps,
            "resumed_from_step": run.start_step,
            "train_time_s": round(run.train_time_s, 2),
            # Selection evaluated the best pair on val already (same weights, seed and step).
            "val": best_info["val"],
            "test": evaluation.evaluate_pair(
                best_model, best_policy, dataset.test, dataset,
                batch_size=config.eval.batch_size, num_random=pc.num_random_eval,
                seed=config.seed, eval_step=eval_step, data_sharding=run.data_sharding,
            ),
        }  # fmt: skip
    io.write_json_atomic(os.path.join(run.workdir, "results.json"), results)
    t = results["test"]
    log.info(
        "%s pair (step %d): FP %.4f, DPTQ %.4f, drop %.2f pts (uniform %.2f, random %.2f)",
        config.mode, results["best_step"], t["fp_accuracy"], t["dptq_accuracy"], t["drop"],
        t["uniform_drop"], t["random_drop"],
    )  # fmt: skip
    return results


def _batch(dataset: data.Dataset, teacher_logits: np.ndarray, step: int, batch_size: int,
           seed: int) -> tuple[np.ndarray, ...]:  # fmt: skip
    batch = data.train_batch(
        dataset.train,
        step,
        batch_size=batch_size,
        seed=seed,
        dataset_stats=dataset,
        shard=distributed.process_shard(),
    )
    return batch.images, batch.labels, teacher_logits[batch.indices]


def _read_best(best_dir: str) -> dict[str, Any] | None:
    return io.read_json(os.path.join(best_dir, "info.json"), None)


config_lib.register(
    "policy_aware", RULES, checks=(*checks.NETWORK_CHECKS, checks.check_pair_budget)
)
