"""Tests for ptq_adversary.artifacts: exact round trips, spec.json, replacement, clear errors."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import artifacts, checkpoint, io, models

MODEL_SPEC = artifacts.ModelSpec(name="cnn", num_classes=10, in_channels=1, weight_bits=8,
                                 kwargs={"widths": (4, 4, 4, 4)}, image_size=(12, 12))  # fmt: skip


def _assert_same_arrays(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _perturbed(state, seed):
    """``state`` with every float leaf moved: BN statistics included, so `rest` is checked too."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + rng.normal(size=x.shape).astype(x.dtype) if x.dtype.kind == "f" else x,
        state,
    )


@pytest.fixture(scope="module")
def model():
    """The built test model, split: ``(QuantizedModel, graphdef, params, rest)``."""
    built = artifacts.build(MODEL_SPEC, seed=0)
    graphdef, params, rest = models.split_model(built)
    return built, graphdef, _perturbed(params, 1), _perturbed(rest, 2)


@pytest.fixture
def saved(tmp_path, model):
    directory = str(tmp_path / "model")
    artifacts.save_model(directory, MODEL_SPEC, model[2], model[3])
    return directory


def _state_dirs(directory):
    return sorted(d for d in os.listdir(directory) if d.startswith("state"))


def test_model_round_trip_is_exact_and_rebuilds_the_same_program(saved, model):
    built, graphdef, params, rest = model
    loaded = artifacts.load_model(saved)
    assert loaded.spec == MODEL_SPEC  # tuples come back as tuples
    assert loaded.spec.kwargs["widths"] == (4, 4, 4, 4) and loaded.spec.image_size == (12, 12)
    assert loaded.num_sites == built.num_sites > 0
    assert loaded.site_names == tuple(built.site_names)
    _assert_same_arrays(loaded.params, params)
    _assert_same_arrays(loaded.rest, rest)
    assert loaded.graphdef == graphdef  # the same program: one compile serves both below
    apply = jax.jit(models.apply_model, static_argnums=0)
    images = np.random.default_rng(0).normal(size=(3, 12, 12, 1)).astype(np.float32)
    bits = np.full((3, built.num_sites), 4, np.int32)
    ours = apply(loaded.graphdef, loaded.params, loaded.rest, images, bits)[0]
    theirs = apply(graphdef, params, rest, images, bits)[0]
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_spec_json_records_the_spec_and_the_current_state_directory(saved):
    assert artifacts.exists(saved)
    raw = io.read_json(os.path.join(saved, "spec.json"))
    state_dir = raw.pop("_state_dir")
    assert raw == {"name": "cnn", "num_classes": 10, "in_channels": 1, "weight_bits": 8,
                   "kwargs": {"widths": [4, 4, 4, 4]}, "image_size": [12, 12],
                   "factory": None}  # fmt: skip
    assert _state_dirs(saved) == [state_dir] and state_dir.startswith("state-")


def test_saving_again_keeps_only_the_newest(saved, model):
    _, _, params, rest = model
    # A state directory left by a save killed before it switched spec.json over.
    shutil.copytree(os.path.join(saved, _state_dirs(saved)[0]), os.path.join(saved, "state-1"))
    newer = _perturbed(params, 3)
    artifacts.save_model(saved, MODEL_SPEC, newer, rest)
    current = io.read_json(os.path.join(saved, "spec.json"))["_state_dir"]
    assert _state_dirs(saved) == [current] and current != "state-1"
    _assert_same_arrays(artifacts.load_model(saved).params, newer)


def test_an_artifact_of_the_old_layout_still_loads(saved, model):
    """Artifacts written before the state-<ns> directories: a plain ``state/``, no key."""
    raw = io.read_json(os.path.join(saved, "spec.json"))
    os.rename(os.path.join(saved, raw.pop("_state_dir")), os.path.join(saved, "state"))
    io.write_json_atomic(os.path.join(saved, "spec.json"), raw)
    _assert_same_arrays(artifacts.load_model(saved).params, model[2])


POLICY_SPEC = artifacts.PolicySpec(num_sites=5, in_channels=1, choices=(2, 4, 8), budget=4.0,
                                   widths=(4,))  # fmt: skip


@pytest.fixture
def saved_policy(tmp_path):
    """``(directory, params, rest)`` of a saved policy artifact."""
    _, params, rest = nnx.split(artifacts.build_policy(POLICY_SPEC, seed=0), nnx.Param, ...)
    params = _perturbed(params, 4)
    directory = str(tmp_path / "policy")
    artifacts.save_policy(directory, POLICY_SPEC, params, rest)
    return directory, params, rest


def test_policy_round_trip_is_exact(saved_policy):
    directory, params, rest = saved_policy
    loaded = artifacts.load_policy(directory)
    assert loaded.spec == POLICY_SPEC and loaded.spec.choices == (2, 4, 8)
    assert loaded.spec.budget_spec.num_sites == 5 and loaded.spec.budget_spec.budget == 4.0
    _assert_same_arrays(loaded.params, params)
    _assert_same_arrays(loaded.rest, rest)


def test_missing_artifact_is_file_not_found(tmp_path):
    assert not artifacts.exists(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^no artifact \(spec\.json\) in .*/nowhere$"):
        artifacts.load_model(str(tmp_path / "nowhere"))


def test_a_cut_short_spec_json_names_the_file(saved):
    with open(os.path.join(saved, "spec.json"), "w") as f:
        f.write('{"name": "cnn", "num_cl')
    with pytest.raises(ValueError, match=r"spec\.json is not valid JSON"):
        artifacts.load_model(saved)


def _truncate_arrays(directory):
    files = glob.glob(os.path.join(directory, "state-*", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(8)


def _remove_state(directory):
    shutil.rmtree(os.path.join(directory, _state_dirs(directory)[0]))


def _assert_one_clear_error(directory, load, capfd):
    capfd.readouterr()
    with pytest.raises(artifacts.ArtifactError) as info:
        load(directory)
    message = str(info.value)
    assert message.startswith(f"artifact {directory} cannot be restored (")
    assert message.endswith("; re-run the stage that wrote it")
    assert "\n" not in message and len(message) < 400
    assert isinstance(info.value, checkpoint.CheckpointError)  # the CLI's one-line errors
    assert "Event loop is closed" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", [_truncate_arrays, _remove_state],
                         ids=["truncated", "state-missing"])  # fmt: skip
def test_damaged_artifact_is_one_clear_error(saved, damage, capfd):
    damage(saved)
    _assert_one_clear_error(saved, artifacts.load_model, capfd)


def test_a_spec_json_that_does_not_describe_the_arrays_is_one_clear_error(saved_policy, capfd):
    directory = saved_policy[0]
    raw = io.read_json(os.path.join(directory, "spec.json"))
    raw["num_sites"] = 6  # another head shape
    io.write_json_atomic(os.path.join(directory, "spec.json"), raw)
    _assert_one_clear_error(directory, artifacts.load_policy, capfd)
