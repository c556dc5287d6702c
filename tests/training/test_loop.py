"""The shared loop (training/loop.py) on a tiny step function: checkpoint cadence, resume equal
to an uninterrupted run, SIGTERM, divergence, and the workdir's config.json binding."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ptq_adversary import config as config_lib
from ptq_adversary import metrics
from ptq_adversary.checkpoint import Checkpointer
from ptq_adversary.training import loop

TOTAL = 10
BATCH = 4


def _config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "trainer": "supervised",
            "data": {"name": "fashion_mnist"},
            "model": {"name": "tiny", "factory": "", "kwargs": {}},
            "optim": {"optimizer": "adamw", "batch_size": BATCH},
            "eval": {"every_steps": 5},
            "log": {"every_steps": 3, "progress": False, "tensorboard": False},
            "ckpt": {"every_steps": 4, "max_to_keep": 10},
        }
    )
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _init():
    return {"w": jnp.zeros(3, jnp.float32), "step": jnp.zeros((), jnp.int32)}


@jax.jit
def _step(state, x):
    """``w += mean(x) * 0.1``; metrics from the state before the update (as a loss is)."""
    loss = jnp.sum(state["w"] ** 2) + jnp.mean(x)
    new = {"w": state["w"] + 0.1 * jnp.mean(x, axis=0), "step": state["step"] + 1}
    return new, {"loss": loss, "accuracy": jnp.mean(x) / 10}


def _batch(step: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(step)
    return (rng.normal(size=(BATCH, 3)).astype(np.float32),)


def _fit(workdir, config=None, *, batch_fn=_batch, step_fn=_step, evals=None):
    config = config or _config()

    def eval_fn(state, step):
        evals.append(step) if evals is not None else None
        return {"accuracy": float(jnp.sum(state["w"]))}

    with loop.Run(config, str(workdir)) as run:
        state = run.restore_or_init(_init())
        start = run.start_step
        state = run.fit(state, step_fn, batch_fn, total_steps=TOTAL, desc="tiny", eval_fn=eval_fn,
                        learning_rate=lambda s: 0.5)  # fmt: skip
        return jax.device_get(state), start, run.ckpt.all_steps()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fresh_run_checkpoints_logs_and_evaluates_at_its_cadence(tmp_path):
    evals = []
    state, start, saved = _fit(tmp_path, evals=evals)
    assert start == 0 and int(state["step"]) == TOTAL
    assert saved == [4, 8, TOTAL]  # every ckpt.every_steps, and the final state
    records = _records(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6, 9, 10]
    assert [r["step"] for r in records if r["split"] == "val"] == [5]  # not at the end
    assert evals == [5]
    assert all(r["learning_rate"] == 0.5 for r in records if r["split"] == "train")
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config == config_lib.to_dict(_config())


def test_restore_or_init_starts_fresh_then_resumes_the_latest_checkpoint(tmp_path):
    with loop.Run(_config(), str(tmp_path)) as run:
        state = run.restore_or_init(_init())
        assert run.start_step == 0 and float(jnp.sum(state["w"])) == 0.0
    final, _, _ = _fit(tmp_path)
    with loop.Run(_config(), str(tmp_path)) as run:
        state = jax.device_get(run.restore_or_init(_init()))
        assert run.start_step == TOTAL
    jax.tree.map(np.testing.assert_array_equal, state, final)


def test_crash_and_resume_equals_uninterrupted(tmp_path):
    reference, _, _ = _fit(tmp_path / "ref")

    def crash_at_6(step):
        if step == 6:  # a checkpoint exists at 4 (with step 4 in its open logging window)
            raise RuntimeError("simulated crash")
        return _batch(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", batch_fn=crash_at_6)
    state, start, _ = _fit(tmp_path / "run")
    assert start == 4
    jax.tree.map(np.testing.assert_array_equal, state, reference)
    # The log reads as one run: the killed run's record at step 6 is never duplicated.
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_the_same(tmp_path):
    reference, _, _ = _fit(tmp_path / "ref")

    def sigterm_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return _batch(step)

    with pytest.raises(loop.Preempted, match="saved a checkpoint at step 3"):
        _fit(tmp_path / "run", batch_fn=sigterm_at_2)
    state, start, _ = _fit(tmp_path / "run")
    assert start == 3
    jax.tree.map(np.testing.assert_array_equal, state, reference)
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")


def test_a_nan_loss_stops_the_run_and_keeps_only_good_checkpoints(tmp_path):
    @jax.jit
    def nan_from_6(state, x):
        new, out = _step(state, x)
        return new, {**out, "loss": jnp.where(state["step"] >= 5, jnp.nan, out["loss"])}

    with pytest.raises(metrics.NonFiniteError, match=r"first at step 6\).*checkpoint is step 4"):
        _fit(tmp_path, step_fn=nan_from_6)
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [4]  # nothing at or after the first bad state


def test_config_json_binds_a_workdir_once_it_holds_progress(tmp_path):
    _fit(tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.name: is 'other' but"):
        loop.Run(_config(**{"model.name": "other"}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before
    # Fields that fix no checkpoint shape may change; a field removed since (e.g. an adamw
    # config's dead momentum in an old config.json) does not block resuming.
    old = json.loads(before)
    old["optim"]["momentum"] = 0.9
    (tmp_path / "config.json").write_text(json.dumps(old))
    _, start, _ = _fit(tmp_path, _config(**{"log.every_steps": 5}))
    assert start == TOTAL
    assert "momentum" not in json.loads((tmp_path / "config.json").read_text())["optim"]


def test_a_workdir_without_progress_takes_another_config(tmp_path):
    loop.prepare_workdir(_config(), str(tmp_path))  # config.json, but no checkpoint yet
    loop.prepare_workdir(_config(**{"model.name": "other"}), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "other"
