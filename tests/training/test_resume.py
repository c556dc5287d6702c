"""Kill -9 and resume: a run killed at any point and started again with the same command ends
bit-identical (on CPU) to an uninterrupted one: results.json, metrics logs and final weights.

The runs are real command lines in subprocesses, killed with SIGKILL (no chance to clean up)
as soon as a given checkpoint has been committed, i.e. while the next steps are running. One
uninterrupted reference run of the pipeline smoke config is shared by the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ptq_adversary import artifacts
from ptq_adversary.checkpoint import COMMIT_FILE
from tests.helpers import REPO, requires_fashion_mnist

pytestmark = [pytest.mark.integration, requires_fashion_mnist]

# The pipeline smoke config, shortened, checkpointing every 2 steps.
_ARGS = (
    "--config.ckpt.every_steps=2",
    "--config.teacher.optim.num_steps=8",
    "--config.eval.uniform_bits=(8,)",
    "--config.log.tensorboard=false",
    "--config.log.progress=false",
)
_CONFIG = "--config=configs/fmnist_pair.py:smoke,mode=detrimental"
# Wall-clock fields, and the step a stage resumed from, legitimately differ.
_TIMING_KEYS = {"train_time_s", "time_s", "resumed_from_step"}
_PATH_KEYS = {"student_dir", "source"}  # absolute paths into the workdir


def _command(workdir: str, config: str = _CONFIG) -> list[str]:
    return [sys.executable, "-m", "ptq_adversary.main", config, f"--workdir={workdir}", *_ARGS]


_CACHE: list[str] = []  # the module's persistent compilation cache directory


def _env() -> dict[str, str]:
    # Every run shares a persistent compilation cache: the restarted runs load the executables
    # the reference compiled (the same code) instead of compiling them again, which would cost
    # most of this file's time. It changes nothing numerically.
    return dict(os.environ, TQDM_DISABLE="1", JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=_CACHE[0],
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # fmt: skip


def _run(workdir: str, config: str = _CONFIG) -> None:
    proc = subprocess.run(_command(workdir, config), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run_and_kill(workdir: str, checkpoint: str, config: str = _CONFIG) -> None:
    """Starts the command and SIGKILLs it once ``workdir/checkpoint`` is committed."""
    marker = os.path.join(workdir, checkpoint, COMMIT_FILE)
    proc = subprocess.Popen(_command(workdir, config), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while not os.path.exists(marker):
            assert proc.poll() is None, f"finished before {checkpoint} appeared"
            assert time.monotonic() < deadline, f"{checkpoint} never appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _strip(tree):
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k not in _TIMING_KEYS | _PATH_KEYS}
    return tree


def _json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _assert_same_arrays(dir_a: str, dir_b: str, load) -> None:
    a, b = load(dir_a), load(dir_b)
    leaves_a = jax.tree.leaves((a.params, a.rest))
    leaves_b = jax.tree.leaves((b.params, b.rest))
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_stage(ref: str, ours: str, stage: str, *, resumed: bool) -> None:
    a, b = os.path.join(ref, stage), os.path.join(ours, stage)
    ra, rb = _json(os.path.join(a, "results.json")), _json(os.path.join(b, "results.json"))
    assert _strip(rb) == _strip(ra)
    assert (rb["resumed_from_step"] > 0) == resumed
    assert _lines(os.path.join(b, "metrics.jsonl")) == _lines(os.path.join(a, "metrics.jsonl"))
    model = "best/model" if stage in ("robust", "detrimental") else "model"
    _assert_same_arrays(os.path.join(a, model), os.path.join(b, model), artifacts.load_model)
    if model == "best/model":
        _assert_same_arrays(os.path.join(a, "best/policy"), os.path.join(b, "best/policy"),
                            artifacts.load_policy)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """One uninterrupted run of the (shortened) pipeline smoke config."""
    _CACHE[:] = [str(tmp_path_factory.mktemp("jax_cache"))]
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run(workdir)
    return workdir


def test_killed_twice_resumes_bit_identical(reference, tmp_path):
    """Killed just after the teacher's first checkpoint, then mid stage B, then finished."""
    workdir = str(tmp_path)
    _run_and_kill(workdir, "teacher/checkpoints/2")
    ckpt_dir = os.path.join(workdir, "teacher", "checkpoints")
    # What SIGKILL may leave behind is never restored: a temporary directory of a save in
    # flight, and (simulated) a step directory whose commit marker never made it to disk.
    os.makedirs(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp-99", "state"), exist_ok=True)
    shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "6"))
    os.remove(os.path.join(ckpt_dir, "6", COMMIT_FILE))
    with open(os.path.join(workdir, "teacher", "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "split": "tr')  # a record cut short by the kill
    # Stage B's step 4 follows its first validation and best-pair selection.
    _run_and_kill(workdir, "detrimental/checkpoints/4")
    _run(workdir)
    _assert_same_stage(reference, workdir, "teacher", resumed=True)
    _assert_same_stage(reference, workdir, "student", resumed=False)
    _assert_same_stage(reference, workdir, "detrimental", resumed=True)
    assert _strip(_json(os.path.join(workdir, "results.json"))) == _strip(
        _json(os.path.join(reference, "results.json"))
    )
