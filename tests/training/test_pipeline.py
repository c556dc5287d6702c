"""Stages A-C: the pair step, stage-C evaluation against a loop, and the smoke pipeline."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ptq_adversary import artifacts, data, evaluation, models, policy, steps
from ptq_adversary import config as config_lib
from ptq_adversary.training import pipeline, supervised
from tests.helpers import REPO, load_config, requires_fashion_mnist


def tiny_pair(seed=0):
    model = models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(seed), widths=(4, 4, 8, 8)
    )
    graphdef, params, rest = models.split_model(model)
    pspec = artifacts.PolicySpec(
        num_sites=model.num_sites, in_channels=1, choices=(2, 3, 4, 5, 6, 8), budget=4.0,
        widths=(4,),
    )  # fmt: skip
    pgraph, pparams, prest = nnx.split(artifacts.build_policy(pspec, seed), nnx.Param, ...)
    return model, (graphdef, params, rest), pspec, (pgraph, pparams, prest)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 12, 12, 1)).astype(np.float32)
    labels = (np.arange(n) % 10).astype(np.int32)
    teacher = rng.normal(size=(n, 10)).astype(np.float32) * 3
    return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(teacher)


@pytest.mark.parametrize("mode", steps.MODES)
def test_pair_step_updates_network_and_policy_and_compiles_once(mode):
    _, (g, p, r), pspec, (pg, pp, pr) = tiny_pair()
    opt, popt = optax.adam(1e-2), optax.adam(1e-2)
    traces = []
    inner = steps.make_pair_train_step(
        g, pg, opt, popt, pspec.budget_spec, mode=mode, num_samples=4, temperature=4.0,
        quant_weight=1.0, margin=5.0, reward="kl", entropy_coef=0.01, quant_batch=8,
    )  # fmt: skip

    def counted(*args):
        traces.append(None)
        return inner(*args)

    step = jax.jit(counted)
    state0 = steps.create_pair_state(p, r, opt, pp, pr, popt, seed=0)
    state1, m1 = step(state0, *_batch(seed=0))
    state2, m2 = step(state1, *_batch(seed=1))  # new data, new step key: new allocations
    assert len(traces) == 1
    changed = lambda a, b: any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert changed(state0.params, state1.params)
    assert changed(state1.policy_params, state2.policy_params)  # zero-init head moves first
    assert changed(state0.policy_params, state1.policy_params)
    jax.tree.map(np.testing.assert_array_equal, state0.rest, state2.rest)  # frozen BN
    assert float(m1["mean_bits"]) == float(m2["mean_bits"]) == 4.0
    assert int(state2.step) == 2


def test_stage_c_equals_a_python_loop_over_examples_and_allocations():
    model, (g, p, r), pspec, (pg, pp, pr) = tiny_pair(seed=3)
    # A policy that prefers different bits per site, so greedy differs from uniform.
    pp = jax.tree.map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), pp)
    rng = np.random.default_rng(0)
    split = data.Split(
        images=rng.integers(0, 256, size=(20, 12, 12, 1), dtype=np.uint8),
        labels=rng.integers(0, 10, size=(20,)).astype(np.int32),
    )
    stats = data.DatasetStats(np.asarray([0.5], np.float32), np.asarray([0.25], np.float32))
    loaded_model = artifacts.LoadedModel(artifacts.ModelSpec("cnn", 10, 1, 8), g, p, r,
                                         model.num_sites, tuple(model.site_names))  # fmt: skip
    loaded_policy = artifacts.LoadedPolicy(pspec, pg, pp, pr)
    out = evaluation.evaluate_pair(loaded_model, loaded_policy, split, stats, batch_size=8,
                                   num_random=2)  # fmt: skip

    budget = pspec.budget_spec
    images = data.normalize(split.images, stats.mean, stats.std)
    fp_right, greedy_right, uniform_right, bits_used = 0, 0, 0, []
    policy_net = nnx.merge(pg, pp, pr)
    uniform = policy.to_bits(jnp.asarray(policy.uniform_allocation(budget)), budget)
    for i in range(len(split)):  # one example and one allocation at a time
        x, y = images[i : i + 1], split.labels[i]
        fp = models.apply_model(g, p, r, x)[0]
        idx = policy.greedy(policy_net(x)[0], budget)
        bits = policy.to_bits(idx, budget)
        bits_used.append(np.asarray(bits))
        q = models.apply_model(g, p, r, x, bits[None])[0]
        u = models.apply_model(g, p, r, x, uniform[None])[0]
        fp_right += int(np.argmax(fp) == y)
        greedy_right += int(np.argmax(q) == y)
        uniform_right += int(np.argmax(u) == y)
    assert out["fp_accuracy"] == pytest.approx(fp_right / 20)
    assert out["dptq_accuracy"] == pytest.approx(greedy_right / 20)
    assert out["uniform_accuracy"] == pytest.approx(uniform_right / 20)
    assert out["mean_bits"] == pytest.approx(4.0)
    hist = np.zeros((model.num_sites, len(budget.choices)))
    for b in bits_used:
        for site, value in enumerate(b):
            hist[site, budget.choices.index(int(value))] += 1 / 20
    np.testing.assert_allclose(out["site_bit_histogram"], hist, atol=1e-6)
    assert "| pair |" in evaluation.format_table({"x": out})


def test_pipeline_config_validation_rejects_infeasible_budget_and_bad_mode():
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config_lib.validate(config)
    config.pairs.quant.budget = 4.1
    with pytest.raises(config_lib.ConfigError, match=r"config\.pairs\.quant\.budget: budget 4\.1"):
        config_lib.validate(config)
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config.pairs.quant.budget = 9.0
    with pytest.raises(config_lib.ConfigError, match="infeasible"):
        config_lib.validate(config)
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config.modes = ("evil",)
    with pytest.raises(config_lib.ConfigError, match=r"config\.modes"):
        config_lib.validate(config)
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config.pairs.quant.choices = (4, 2)
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.pairs\.quant\.choices: must be a non"
    ):
        config_lib.validate(config)


def _smoke_config():
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config.log.tensorboard = False
    # The student is a user's own plain-NNX architecture, built from its import path: the
    # whole pipeline runs on it (the registry student runs in test_sharding / test_resume).
    config.student.model.name = "small_net"
    config.student.model.factory = "tests.user_model:build"
    config.student.model.kwargs = type(config.student.model.kwargs)({"width": 4})
    return config


@pytest.fixture(scope="module")
def smoke_pipeline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    results = pipeline.run_pipeline(_smoke_config(), workdir)
    return workdir, results


@requires_fashion_mnist
@pytest.mark.integration
def test_smoke_pipeline_end_to_end(smoke_pipeline):
    workdir, results = smoke_pipeline
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk == json.loads(json.dumps(results))
    assert set(results["pairs"]) == {"robust", "detrimental"}
    for pair in results["pairs"].values():
        assert pair["mean_bits"] == pytest.approx(results["budget"])
        assert pair["drop"] == pytest.approx(100 * (pair["fp_accuracy"] - pair["dptq_accuracy"]))
        assert 0 <= pair["random_accuracy"] <= 1 and 0 <= pair["uniform_accuracy"] <= 1
    for stage in ("teacher", "student", "robust", "detrimental"):
        assert os.path.exists(os.path.join(workdir, stage, "results.json"))
    assert os.path.exists(os.path.join(workdir, "robust", "best", "policy", "spec.json"))
    assert "| robust |" in open(os.path.join(workdir, "results.md")).read()
    # The student learns from the teacher's cached logits, one row per training example.
    logits = np.load(os.path.join(workdir, "student", "teacher_logits.npy"))
    assert logits.shape == (256, 10)
    student = artifacts.load_model(os.path.join(workdir, "robust", "best", "model"))
    assert student.spec.factory == "tests.user_model:build"
    assert student.site_names == ("conv2", "head")


@requires_fashion_mnist
@pytest.mark.integration
def test_pipeline_skips_finished_stages(smoke_pipeline, monkeypatch):
    workdir, results = smoke_pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr(supervised, "train_and_evaluate", must_not_run)
    assert pipeline.run_pipeline(_smoke_config(), workdir)["pairs"] == results["pairs"]


@requires_fashion_mnist
@pytest.mark.integration
def test_interrupted_stage_b_resumes_to_the_same_pair(smoke_pipeline, tmp_path, monkeypatch):
    reference_dir, reference = smoke_pipeline
    workdir = str(tmp_path)
    for stage in ("teacher", "student"):
        shutil.copytree(os.path.join(reference_dir, stage), os.path.join(workdir, stage))
    config = _smoke_config()
    config.modes = ("detrimental",)
    config.ckpt.every_steps = 4  # saving more often does not change the result
    real = data.train_batch

    def crash_at_step_6(split, step, **kw):
        if step == 6:
            raise RuntimeError("simulated crash")
        return real(split, step, **kw)

    monkeypatch.setattr(data, "train_batch", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_pipeline(config, workdir)
    monkeypatch.setattr(data, "train_batch", real)
    results = pipeline.run_pipeline(config, workdir)
    ours = json.load(open(os.path.join(workdir, "detrimental", "results.json")))
    theirs = json.load(open(os.path.join(reference_dir, "detrimental", "results.json")))
    assert ours["resumed_from_step"] == 4
    for key in ("best_step", "val", "test"):
        assert ours[key] == theirs[key]
    assert results["pairs"]["detrimental"] == reference["pairs"]["detrimental"]


_MULTI_DEVICE_SCRIPT = """
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tests.training import test_pipeline as t
from ptq_adversary import artifacts, data, evaluation
assert jax.device_count() == 4
model, (g, p, r), pspec, (pg, pp, pr) = t.tiny_pair()
# Committed to one device, as orbax restores an artifact.
p, r, pp, pr = jax.device_put((p, r, pp, pr), jax.devices()[0])
rng = np.random.default_rng(0)
split = data.Split(images=rng.integers(0, 256, size=(20, 12, 12, 1), dtype=np.uint8),
                   labels=rng.integers(0, 10, size=(20,)).astype(np.int32))
stats = data.DatasetStats(np.asarray([0.5], np.float32), np.asarray([0.25], np.float32))
m = artifacts.LoadedModel(artifacts.ModelSpec("cnn", 10, 1, 8), g, p, r, model.num_sites,
                          tuple(model.site_names))
pol = artifacts.LoadedPolicy(pspec, pg, pp, pr)
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
kw = dict(batch_size=8, num_random=2)
one = evaluation.evaluate_pair(m, pol, split, stats, **kw)
four = evaluation.evaluate_pair(m, pol, split, stats, **kw,
                                data_sharding=NamedSharding(mesh, PartitionSpec("data")))
assert one["dptq_accuracy"] == four["dptq_accuracy"], (one, four)
assert one["fp_accuracy"] == four["fp_accuracy"], (one, four)
print("ok")
"""


def test_stage_c_with_batches_sharded_over_four_devices():
    """Artifacts restored on one device evaluate against batches sharded over a mesh."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
