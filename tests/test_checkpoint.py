"""Tests for ptq_adversary.checkpoint on a tiny state: round trip, retention, commit markers,
resume, and the one-line errors for damaged or foreign checkpoints."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from ptq_adversary import checkpoint
from ptq_adversary.checkpoint import Checkpointer, CheckpointError


def _state(step, shape=(2, 3)):
    """A small array pytree like a train state: params, optimizer moments, an RNG key, a step."""
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + step
    return {
        "params": {"w": w, "b": np.full((shape[-1],), -step, np.float32)},
        "opt": {"mu": w / 2, "count": np.asarray(step, np.int32)},
        "key": np.asarray([step, 7], np.uint32),
        "step": np.asarray(step, np.int32),
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def saved(tmp_path):
    """A directory holding complete checkpoints of steps 1, 2 and 3 (the two newest kept)."""
    directory = tmp_path / "checkpoints"
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(step, _state(step), {"loss": 1.0 / step, "note": f"s{step}"})
        ckpt.wait()
        assert not ckpt.save(3, _state(99))  # already saved: a second final save is harmless
    return str(directory)


def test_round_trip_retention_and_resume_from_latest(saved):
    with Checkpointer(saved, max_to_keep=2) as ckpt:  # a new process resuming
        assert ckpt.directory == os.path.abspath(saved)
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        state, meta = ckpt.restore(_state(0))
        _assert_same(state, _state(3))  # the step-3 save, not the refused step-99 one
        assert meta == {"loss": 1.0 / 3, "note": "s3"}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
        older, meta = ckpt.restore(abstract, step=2)
        _assert_same(older, _state(2))
        assert meta["note"] == "s2"
        ckpt.delete(3)
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]


def test_meta_defaults_to_empty(tmp_path):
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(5, _state(5))
        ckpt.wait()
        assert ckpt.restore(_state(0))[1] == {}


def test_no_checkpoint_is_file_not_found(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(_state(0))


def test_a_step_without_commit_marker_is_set_aside_and_a_killed_save_ignored(saved):
    shutil.copytree(os.path.join(saved, "3"), os.path.join(saved, "4"))
    os.remove(os.path.join(saved, "4", checkpoint.COMMIT_FILE))
    os.makedirs(os.path.join(saved, "5.orbax-checkpoint-tmp-1234", "state"))
    with Checkpointer(saved, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]
        _assert_same(ckpt.restore(_state(0))[0], _state(3))
    names = os.listdir(saved)
    assert "4" not in names and sum(n.startswith("4.incomplete-") for n in names) == 1
    assert os.path.isfile(os.path.join(saved, "3", checkpoint.COMMIT_FILE))


@pytest.mark.parametrize("damage", ["truncated data", "garbled metadata"])
def test_damaged_checkpoint_is_one_clear_error_naming_the_fix(saved, damage):
    if damage == "truncated data":
        files = glob.glob(os.path.join(saved, "3", "state", "**", "d", "*"), recursive=True)
        assert files
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(8)
    else:
        with open(os.path.join(saved, "3", "state", "_METADATA"), "w") as f:
            f.write('{"tree_metadata": ')
    step3 = os.path.join(os.path.abspath(saved), "3")
    with Checkpointer(saved) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(_state(0))
        message = str(info.value)
        assert "\n" not in message and len(message) < 400
        assert message.startswith(f"checkpoint {step3} is damaged (corrupt or truncated: ")
        assert message.endswith(f"; delete {step3} to resume from step 2")
        _assert_same(ckpt.restore(_state(0), step=2)[0], _state(2))  # the older one is fine


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (_state(0, shape=(3, 2)), r"opt/mu has shape \(2, 3\) there but \(3, 2\) here"),
        ({**_state(0), "step": np.asarray(0, np.float32)}, r"step has dtype int32 there but "
         r"float32 here"),
        ({k: v for k, v in _state(0).items() if k != "key"}, "key is in the checkpoint but not "
         "in this config's state"),
        ({**_state(0), "extra": np.zeros(2, np.float32)}, "extra is missing from the checkpoint"),
    ],
    ids=["shape", "dtype", "extra-in-checkpoint", "missing-from-checkpoint"],
)  # fmt: skip
def test_another_runs_state_names_the_first_difference(saved, target, expected):
    # The first difference in sorted order of the arrays both hold (opt/mu before params/w).
    with Checkpointer(saved) as ckpt:
        with pytest.raises(CheckpointError, match=r"^checkpoint .*/3 holds another run's state "
                           r"\(" + expected + r"\); use a new --workdir, or the config that "
                           r"wrote it$"):  # fmt: skip
            ckpt.restore(target)
