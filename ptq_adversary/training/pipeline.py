"""The paper's pipeline: teacher -> stage A (student) -> stage B (pairs) -> stage C (table).

Each stage runs in its own sub-directory of the workdir with its own trainer, so any stage can
also be run alone (``config.stage``), and a stage whose ``results.json`` exists is skipped while
an interrupted one resumes from its checkpoints::

    DIR/teacher/      supervised training on labels (training.supervised)
    DIR/student/      distillation from the teacher's cached logits (training.distill)
    DIR/robust/       policy-aware training, robust mode (training.policy_aware)
    DIR/detrimental/  policy-aware training, detrimental mode
    DIR/results.json  stage C: both pairs side by side (schema in docs/OUTPUTS.md)
    DIR/results.md    the same as a markdown table
    DIR/timing.json   wall time of each stage, summed over resumed invocations

Stage configs are derived from the pipeline config (see configs/fmnist_pair.py): the shared
sections (``seed``, ``data``, ``eval``, ``log``, ``ckpt``) plus the stage's own section. A
pipeline config is valid when its own fields are and every stage config is by its trainer's
rules; an error names the field as the pipeline config spells it (:func:`pipeline_field`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from ptq_adversary import config as config_lib
from ptq_adversary import evaluation, io, steps
from ptq_adversary.training import distill, loop, policy_aware, supervised

__all__ = ["RULES", "STAGES", "check_stages", "pipeline_field", "run_pipeline", "stage_configs"]

log = logging.getLogger(__name__)

STAGES = ("teacher", "student", "robust", "detrimental", "evaluate")
_SHARED = ("seed", "data", "eval", "log", "ckpt")


def _shared(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for key in _SHARED:
        out[key] = copy.deepcopy(config[key])
    return out


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The config of every trainer stage of the pipeline, keyed by stage name."""
    workdir = os.path.abspath(workdir)
    teacher = _shared(config)
    teacher.trainer = "supervised"
    teacher.model = copy.deepcopy(config.teacher.model)
    teacher.optim = copy.deepcopy(config.teacher.optim)

    student = _shared(config)
    student.trainer = "distill"
    student.data.augment = False  # teacher logits are cached on un-augmented images
    student.model = copy.deepcopy(config.student.model)
    student.optim = copy.deepcopy(config.student.optim)
    student.kd = copy.deepcopy(config.student.kd)
    student.teacher = ml_collections.ConfigDict({"model_dir": os.path.join(workdir, "teacher",
                                                                            "model")})  # fmt: skip
    configs = {"teacher": teacher, "student": student}
    for mode in _modes(config):
        pair = _shared(config)
        pair.trainer = "policy_aware"
        pair.data.augment = False
        pair.mode = mode
        pair.student_dir = os.path.join(workdir, "student")
        for key in ("quant", "policy", "pair", "optim"):
            pair[key] = copy.deepcopy(config.pairs[key])
        # Mode-specific loss settings (e.g. the weight lambda of the quantized term).
        with pair.pair.unlocked():  # the command line hands over a locked config
            for key, value in config.pairs.per_mode.get(mode, {}).items():
                pair.pair[key] = value
        pair.model = copy.deepcopy(config.student.model)  # for validation of the budget
        # Matched-pair selection needs frequent validation; the other stages evaluate rarely.
        pair.eval.every_steps = config.pairs.eval_every_steps
        configs[mode] = pair
    return configs


# Where each stage config's sections come from in the pipeline config (the rest is shared).
_SECTION_SOURCES = {
    "teacher": {"model": "teacher.model", "optim": "teacher.optim"},
    "student": {"model": "student.model", "optim": "student.optim", "kd": "student.kd"},
    "pair": {
        "model": "student.model",
        "quant": "pairs.quant",
        "policy": "pairs.policy",
        "pair": "pairs.pair",
        "optim": "pairs.optim",
    },
}


def pipeline_field(stage: str, field: str) -> str:
    """The pipeline-config name of a stage config's ``field`` (for error messages)."""
    sources = _SECTION_SOURCES["pair" if stage in ("robust", "detrimental") else stage]
    head, _, tail = field.partition(".")
    if head in sources:
        return f"{sources[head]}.{tail}" if tail else sources[head]
    return field


def _modes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(config.modes)


def _check_modes(v: Any) -> str | None:
    if not isinstance(v, list | tuple) or not v or any(m not in steps.MODES for m in v):
        return f"must be a non-empty list of {list(steps.MODES)}, got {v!r}"
    return None


#: The pipeline config's own fields (the stages' are checked by :func:`check_stages`).
RULES = (
    config_lib.Rule("stage", config_lib.one_of(("all", *STAGES))),
    config_lib.Rule("modes", _check_modes),
)


def check_stages(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Validates every stage config by its trainer's rules; a ConfigError names the field as
    the pipeline config spells it, with the stage."""
    for stage, stage_config in stage_configs(config, "workdir").items():
        try:
            config_lib.validate(stage_config, num_devices=num_devices)
        except config_lib.ConfigError as err:
            if err.field is None:
                raise
            raise config_lib.ConfigError(
                pipeline_field(stage, err.field), f"{err.message} (stage {stage})"
            ) from None


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the requested stages (``config.stage``: one name or ``'all'``).

    Returns:
      The stage-C results (also in ``workdir/results.json``) once both pairs exist, else the
      results of the last stage run.
    """
    workdir = os.path.abspath(workdir)
    configs = stage_configs(config, workdir)
    for cfg in configs.values():  # fail before anything runs
        config_lib.validate(cfg, num_devices=jax.device_count())
    loop.prepare_workdir(config, workdir)

    trainers = {
        "teacher": supervised.train_and_evaluate,
        "student": distill.train_and_evaluate,
        **{mode: policy_aware.train_and_evaluate for mode in _modes(config)},
    }
    wanted = STAGES if config.stage == "all" else (config.stage,)
    timing = io.read_json(os.path.join(workdir, "timing.json"), None) or {}
    result: dict[str, Any] = {}
    for stage in STAGES:
        if stage not in wanted or (stage != "evaluate" and stage not in trainers):
            continue
        stage_dir = os.path.join(workdir, stage)
        if stage == "evaluate":
            result = _stage_c(config, workdir, timing)
            continue
        done = io.read_json(os.path.join(stage_dir, "results.json"), None)
        if done is not None:
            log.info("stage %s: done earlier (%s), skipped", stage, stage_dir)
            result = done
            continue
        t0 = time.perf_counter()
        result = trainers[stage](configs[stage], stage_dir)
        timing[stage] = timing.get(stage, 0.0) + round(time.perf_counter() - t0, 2)
        io.write_json_atomic(os.path.join(workdir, "timing.json"), timing)
    return result


def _stage_c(config: ml_collections.ConfigDict, workdir: str,
             timing: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    teacher = io.read_json(os.path.join(workdir, "teacher", "results.json"), None)
    student = io.read_json(os.path.join(workdir, "student", "results.json"), None)
    pairs = {m: io.read_json(os.path.join(workdir, m, "results.json"), None) for m in config.modes}
    missing = [name for name, r in {"teacher": teacher, "student": student, **pairs}.items()
               if r is None]  # fmt: skip
    if missing:
        raise FileNotFoundError(f"stage C needs the results of stages {missing} in {workdir}")
    rows = {mode: r["test"] for mode, r in pairs.items()}
    fps = [student["test"]["accuracy"]] + [r["fp_accuracy"] for r in rows.values()]
    results = {
        "dataset": config.data.name,
        "teacher_model": config.teacher.model.name,
        "student_model": config.student.model.name,
        "choices": list(config.pairs.quant.choices),
        "budget": float(config.pairs.quant.budget),
        "teacher": {"test_accuracy": teacher["test"]["accuracy"]},
        "student": {
            "test_accuracy": student["test"]["accuracy"],
            "val_accuracy": student["val"]["accuracy"],
            "uniform_test_accuracy": {
                k.removeprefix("accuracy_uniform_"): v
                for k, v in student["test"].items()
                if k.startswith("accuracy_uniform_")
            },
        },
        "pairs": {
            mode: {"best_step": pairs[mode]["best_step"], **rows[mode], "val": pairs[mode]["val"]}
            for mode in rows
        },  # fmt: skip
        "max_fp_gap_points": round(100.0 * (max(fps) - min(fps)), 4),
        "time_s": {**timing, "total": round(sum(timing.values()), 2)},
    }
    table = evaluation.format_table(rows)
    io.write_json_atomic(os.path.join(workdir, "results.json"), results)
    header = (
        f"Stage C on {config.data.name} test ({rows[next(iter(rows))]['num_examples']} images), "
        f"student {config.student.model.name}, budget {results['budget']:g} mean bits over "
        f"choices {results['choices']}; stage-A student FP accuracy "
        f"{student['test']['accuracy']:.2%}, max FP gap {results['max_fp_gap_points']:.2f} pts."
    )
    io.write_text_atomic(os.path.join(workdir, "results.md"), f"{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}\n", flush=True)
    return results


config_lib.register("pipeline", RULES, checks=(check_stages,))
