"""End-to-end runs of the supervised trainer on the smoke config: results, resume, preemption."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from ptq_adversary import artifacts, data, models, steps
from ptq_adversary import config as config_lib
from ptq_adversary.checkpoint import Checkpointer
from ptq_adversary.training import supervised, toolkit
from tests.helpers import REPO, load_config, requires_fashion_mnist

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def _config():
    config = load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")
    config.log.tensorboard = False
    return config


def _final_state(workdir, config):
    """Restores the final checkpoint of a finished run as a pytree of numpy arrays."""
    dataset = data.load_dataset(
        config.data.name, val_size=config.data.val_size, train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )  # fmt: skip
    graphdef, params, rest = models.split_model(toolkit.build_model(config, dataset))
    total = data.steps_per_epoch(len(dataset.train), config.optim.batch_size) * 2
    opt = toolkit.make_optimizer(config.optim, total)
    target = steps.create_train_state(params, rest, opt, config.seed)
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state, meta = ckpt.restore(target)
    return jax.device_get(state), meta


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    results = supervised.train_and_evaluate(_config(), workdir)
    return workdir, results


def test_smoke_run_writes_results_metrics_and_checkpoints(uninterrupted):
    workdir, results = uninterrupted
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk == json.loads(json.dumps(results))
    assert results["steps"] == 16 and results["num_sites"] == len(results["site_names"])
    for split in ("val", "test"):
        for key in ("accuracy", "loss", "accuracy_uniform_8", "accuracy_uniform_4"):
            assert 0.0 <= results[split][key] <= (1.0 if "accuracy" in key else 10.0)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [4, 8, 12, 16]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["name"] == "teacher_cnn"


def _assert_same_run(workdir_a, workdir_b):
    config = _config()
    state_a, _ = _final_state(workdir_a, config)
    state_b, _ = _final_state(workdir_b, config)
    assert int(state_a.step) == int(state_b.step) == 16
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    res_a = json.load(open(os.path.join(workdir_a, "results.json")))
    res_b = json.load(open(os.path.join(workdir_b, "results.json")))
    assert res_a["test"] == res_b["test"] and res_a["val"] == res_b["val"]
    rec_a = [json.loads(x) for x in open(os.path.join(workdir_a, "metrics.jsonl"))]
    rec_b = [json.loads(x) for x in open(os.path.join(workdir_b, "metrics.jsonl"))]
    # The resumed run's log reads as one run: the same steps and values, no duplicates.
    assert [(r["step"], r["split"]) for r in rec_a] == [(r["step"], r["split"]) for r in rec_b]
    assert rec_a == rec_b


def test_crash_and_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    real = data.train_batch

    def crash_at_step_11(split, step, **kw):
        if step == 11:  # checkpoints exist at 8; steps 9-10 are lost and recomputed
            raise RuntimeError("simulated crash")
        return real(split, step, **kw)

    monkeypatch.setattr(data, "train_batch", crash_at_step_11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        supervised.train_and_evaluate(_config(), workdir)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    monkeypatch.setattr(data, "train_batch", real)
    results = supervised.train_and_evaluate(_config(), workdir)
    assert results["resumed_from_step"] == 8
    _assert_same_run(uninterrupted[0], workdir)


def test_sigterm_saves_and_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    real = data.train_batch

    def sigterm_at_step_5(split, step, **kw):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(split, step, **kw)

    monkeypatch.setattr(data, "train_batch", sigterm_at_step_5)
    with pytest.raises(SystemExit, match="saved a checkpoint at step 6"):
        supervised.train_and_evaluate(_config(), workdir)
    monkeypatch.setattr(data, "train_batch", real)
    results = supervised.train_and_evaluate(_config(), workdir)
    assert results["resumed_from_step"] == 6
    _assert_same_run(uninterrupted[0], workdir)


def test_workdir_of_another_model_is_rejected(uninterrupted):
    config = _config()
    config.model.name = "cnn"
    config.model.kwargs = type(config.model.kwargs)({"widths": (4, 4, 4, 4)})
    before = sorted(os.listdir(uninterrupted[0]))
    with pytest.raises(config_lib.ConfigError, match="workdir holds a run with 'teacher_cnn'"):
        supervised.train_and_evaluate(config, uninterrupted[0])
    assert sorted(os.listdir(uninterrupted[0])) == before


def test_model_artifact_reproduces_the_final_evaluation(uninterrupted):
    workdir, results = uninterrupted
    loaded = artifacts.load_model(os.path.join(workdir, "model"))
    assert loaded.spec.name == "teacher_cnn" and loaded.num_sites == results["num_sites"]
    config = _config()
    dataset = data.load_dataset(
        config.data.name, val_size=config.data.val_size, train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )  # fmt: skip
    images = data.normalize(dataset.test.images, dataset.mean, dataset.std)
    logits, _ = jax.jit(models.apply_model, static_argnums=0)(
        loaded.graphdef, loaded.params, loaded.rest, images
    )
    accuracy = float(np.mean(np.argmax(logits, -1) == dataset.test.labels))
    assert accuracy == pytest.approx(results["test"]["accuracy"], abs=1e-9)
