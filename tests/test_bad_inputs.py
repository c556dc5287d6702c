"""The bad-input catalogue: each bad input is rejected with a non-zero exit and one line.

One parametrized case per bad input (its id is the catalogue's short name). Most run in-process
through :func:`ptq_adversary.cli.execute`, the command line's own error path; a few run the real
command in a subprocess to show the exit status and that stderr carries no traceback. Config
errors must leave the workdir untouched.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ptq_adversary import cli, data
from ptq_adversary import config as config_lib
from ptq_adversary.checkpoint import Checkpointer
from ptq_adversary.training import supervised
from tests.helpers import REPO, load_config, requires_fashion_mnist


def _config(name: str, arg: str = "smoke", **overrides: Any):
    """A config file's ``get_config(arg)`` with dotted-field overrides, locked like the CLI's."""
    config = load_config(REPO / "configs" / f"{name}.py", arg)
    config.log.tensorboard = False
    config.log.progress = False
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        with config.unlocked():
            node[leaf] = value
    config.lock()
    return config


def _snapshot(path: str) -> dict[str, tuple[int, int]] | None:
    """Every file under ``path`` with its size and mtime; None if ``path`` does not exist."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


@dataclasses.dataclass(frozen=True)
class Bad:
    """One catalogue entry.

    Attributes:
      id: short name.
      make: ``(tmp_path, request) -> (config, workdir)``.
      expected: regex the stderr line must match after ``error: ``.
      status: expected exit status.
      config_error: the workdir must be left exactly as it was.
    """

    id: str
    make: Callable[[Any, Any], tuple[Any, str]]
    expected: str
    status: int = 2
    config_error: bool = True


def _override(name: str, **overrides: Any) -> Callable[[Any, Any], tuple[Any, str]]:
    return lambda tmp_path, request: (_config(name, **overrides), str(tmp_path / "run"))


_CNN, _PAIR = "fmnist_cnn", "fmnist_pair"
_ONE_LAYER = "tests.user_model:build_one_layer"  # tests/user_model.py: a model without a site
_MODELS = r"\['cnn', 'resnet18', 'resnet20', 'teacher_cnn', 'wrn16_4'\]"
_CHOICES = r"must be a non-empty list of unique bit-widths in \[2, 16\] sorted ascending"

CONFIG_CASES = [
    Bad("unknown-model", _override(_CNN, **{"model.name": "resnet99"}),
        rf"config\.model\.name: must be one of {_MODELS}, got 'resnet99' \(for your own model "
        r"set model\.factory='package\.module:function'\)$"),
    Bad("unknown-teacher-model", _override(_PAIR, **{"teacher.model.name": "vit"}),
        rf"config\.teacher\.model\.name: must be one of {_MODELS}, got 'vit' \(for your own model "
        r"set model\.factory='package\.module:function'\) \(stage teacher\)$"),
    Bad("unknown-dataset", _override(_CNN, **{"data.name": "imagenet"}),
        r"config\.data\.name: must be one of \['cifar10', 'cifar100', 'fashion_mnist', 'mnist', "
        r"'svhn_cropped'\], got 'imagenet'$"),
    Bad("unknown-mode", lambda t, r: (_config(_PAIR, "smoke,mode=evil"), str(t / "run")),
        r"config\.modes: must be a non-empty list of \['robust', 'detrimental'\], "
        r"got \('evil',\)$"),
    Bad("unknown-trainer", _override(_CNN, trainer="magic"),
        r"config\.trainer: must be one of \[.*'distill', 'pipeline', 'policy_aware', "
        r"'supervised'\], got 'magic'$"),
    Bad("unknown-reward", _override(_PAIR, **{"pairs.pair.reward": "acc"}),
        r"config\.pairs\.pair\.reward: must be one of \['ce', 'kl'\], got 'acc'"),
    Bad("bits-below-2", _override(_PAIR, **{"pairs.quant.choices": (1, 2, 4)}),
        r"config\.pairs\.quant\.choices: entries must be an int in \[2, 16\], got 1 "),
    Bad("bits-above-16", _override(_PAIR, **{"pairs.quant.choices": (2, 4, 17)}),
        r"config\.pairs\.quant\.choices: entries must be an int in \[2, 16\], got 17 "),
    Bad("bits-empty", _override(_PAIR, **{"pairs.quant.choices": ()}),
        rf"config\.pairs\.quant\.choices: {_CHOICES}, got \[\] "),
    Bad("bits-unsorted", _override(_PAIR, **{"pairs.quant.choices": (4, 2, 3)}),
        rf"config\.pairs\.quant\.choices: {_CHOICES}, got \[4, 2, 3\] "),
    Bad("bits-duplicate", _override(_PAIR, **{"pairs.quant.choices": (2, 2, 4)}),
        rf"config\.pairs\.quant\.choices: {_CHOICES}, got \[2, 2, 4\] "),
    Bad("weight-bits-1", _override(_CNN, **{"model.weight_bits": 1}),
        r"config\.model\.weight_bits: must be an int in \[2, 16\] or None, got 1$"),
    Bad("budget-infeasible", _override(_PAIR, **{"pairs.quant.budget": 9.0}),
        r"config\.pairs\.quant\.budget: budget 9 is infeasible for L=4 sites with choices "
        r"\(2,3,4,5,6,8\): .*feasible mean-bit budgets lie in \[2, 8\] in steps of 1/4"),
    Bad("budget-off-grid", lambda t, r: (_config(_PAIR, "smoke,budget=4.1"), str(t / "run")),
        r"config\.pairs\.quant\.budget: budget 4\.1 is infeasible .* in steps of 1/4"),
    Bad("lr-zero", _override(_CNN, **{"optim.learning_rate": 0.0}),
        r"config\.optim\.learning_rate: must be > 0, got 0\.0$"),
    Bad("lr-negative", _override(_PAIR, **{"pairs.optim.learning_rate": -1.0}),
        r"config\.pairs\.optim\.learning_rate: must be > 0, got -1\.0 \(stage robust\)$"),
    Bad("lr-inf", _override(_CNN, **{"optim.learning_rate": float("inf")}),
        r"config\.optim\.learning_rate: must be a finite number > 0, got inf$"),
    Bad("policy-lr-zero", _override(_PAIR, **{"pairs.policy.learning_rate": 0.0}),
        r"config\.pairs\.policy\.learning_rate: must be > 0, got 0\.0 \(stage robust\)$"),
    Bad("batch-zero", _override(_CNN, **{"optim.batch_size": 0}),
        r"config\.optim\.batch_size: must be > 0, got 0$"),
    Bad("eval-batch-negative", _override(_CNN, **{"eval.batch_size": -8}),
        r"config\.eval\.batch_size: must be > 0, got -8$"),
    Bad("batch-over-data", _override(_CNN, **{"optim.batch_size": 512}),
        r"config\.optim\.batch_size: must be <= data\.train_limit \(256\), .* got 512$"),
    Bad("P-one", _override(_PAIR, **{"pairs.pair.num_samples": 1}),
        r"config\.pairs\.pair\.num_samples: must be an int >= 2 \(leave-one-out baseline\), "
        r"got 1 "),
    Bad("P-zero", _override(_PAIR, **{"pairs.pair.num_samples": 0}),
        r"config\.pairs\.pair\.num_samples: must be an int >= 2 .*, got 0 "),
    Bad("steps-zero", _override(_CNN, **{"optim.num_steps": 0}),
        r"config\.optim\.num_steps: must be > 0, got 0$"),
    Bad("steps-negative", _override(_PAIR, **{"pairs.optim.num_steps": -5}),
        r"config\.pairs\.optim\.num_steps: must be > 0, got -5 \(stage robust\)$"),
    Bad("epochs-zero", _override(_CNN, **{"optim.num_epochs": 0.0}),
        r"config\.optim\.num_epochs: must be > 0, got 0\.0$"),
    Bad("ckpt-every-zero", _override(_CNN, **{"ckpt.every_steps": 0}),
        r"config\.ckpt\.every_steps: must be > 0, got 0$"),
    Bad("seed-negative", _override(_CNN, seed=-1), r"config\.seed: must be an int >= 0, got -1$"),
    Bad("model-kwarg-unknown", _override(_CNN, **{"model.kwargs.depth": 3}),
        r"config\.model\.kwargs\.depth: is not an argument of model 'teacher_cnn'; allowed: "),
    Bad("factory-unimportable", _override(_CNN, **{"model.factory": "no_such_pkg.nets:build"}),
        r"config\.model\.factory: model factory 'no_such_pkg\.nets:build': cannot import "
        r"'no_such_pkg\.nets': No module named 'no_such_pkg'$"),
    Bad("factory-malformed", _override(_CNN, **{"model.factory": "user_model.build"}),
        r"config\.model\.factory: model factory must look like 'package\.module:function', "
        r"got 'user_model\.build'$"),
    Bad("factory-no-sites", _override(_PAIR, **{"student.model.kwargs": {},
                                               "student.model.factory": _ONE_LAYER}),
        r"config\.student\.model: cannot derive the quantization sites: no quantization site "
        r"found: .* so bits would have no effect \(stage robust\)$"),
]  # fmt: skip


# ------------------------------------------------------------------ workdir and data cases
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step smoke run with checkpoints at steps 1 and 2."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = _config(_CNN, **{"optim.num_steps": 2, "ckpt.every_steps": 1,
                              "eval.uniform_bits": (8,)})  # fmt: skip
    supervised.train_and_evaluate(config, workdir)
    return workdir


def _copy_trained(tmp_path, request) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(request.getfixturevalue("trained"), workdir)
    return workdir


def _unwritable(tmp_path, request):
    (tmp_path / "a_file").write_text("not a directory")
    return _config(_CNN), str(tmp_path / "a_file" / "run")


def _other_config(tmp_path, request):
    # The workdir holds a finished run of teacher_cnn; this config asks for the cnn.
    workdir = _copy_trained(tmp_path, request)
    return _config(_CNN, "smoke,model=cnn"), workdir


def _other_optimizer_state(tmp_path, request):
    # Same model, but gradient clipping adds optimizer state the checkpoints lack.
    workdir = _copy_trained(tmp_path, request)
    return _config(_CNN, **{"optim.num_steps": 2, "optim.grad_clip_norm": 1.0}), workdir


def _foreign_checkpoints(tmp_path, request):
    # Checkpoints of another model without the config.json that would have caught it.
    workdir = _copy_trained(tmp_path, request)
    os.remove(os.path.join(workdir, "config.json"))
    return _config(_CNN, "smoke,model=cnn", **{"optim.num_steps": 2}), workdir


def _truncated_checkpoint(tmp_path, request):
    workdir = _copy_trained(tmp_path, request)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "**", "d", "*"),
                          recursive=True):  # fmt: skip
        with open(path, "r+b") as f:
            f.truncate(8)
    return _config(_CNN, **{"optim.num_steps": 2}), workdir


def _garbled_checkpoint_metadata(tmp_path, request):
    workdir = _copy_trained(tmp_path, request)
    with open(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": ')
    return _config(_CNN, **{"optim.num_steps": 2}), workdir


def _offline_dataset(tmp_path, request):
    empty = tmp_path / "tfds"
    empty.mkdir()
    config = _config(_CNN, **{"data.name": "cifar10", "data.data_dir": str(empty)})
    return config, str(tmp_path / "run")


def _missing_fashion_mnist(tmp_path, request):
    config = _config(_CNN, **{"data.data_dir": str(tmp_path / "nowhere")})
    return config, str(tmp_path / "run")


def _constant_images(tmp_path, request):
    # A dataset whose pixels are all equal: std 0, so normalised images would be NaN/inf.
    images = np.zeros((300, 28, 28, 1), np.uint8)
    labels = (np.arange(300) % 10).astype(np.int32)
    raw = data.RawDataset(data.Split(images, labels), data.Split(images[:50], labels[:50]),
                          tuple(str(i) for i in range(10)))  # fmt: skip
    request.getfixturevalue("monkeypatch").setitem(data.DATASETS, "fashion_mnist", lambda d: raw)
    return _config(_CNN, **{"data.val_size": 20}), str(tmp_path / "run")


def _missing_teacher(tmp_path, request):
    return _config(_PAIR, "smoke,stage=student"), str(tmp_path / "run")


def _diverging(tmp_path, request):
    # One warm-up step at learning rate 0 (a good state), then 1e30 blows the weights up.
    config = _config(_CNN, **{"optim.learning_rate": 1e30, "optim.warmup_fraction": 0.2,
                              "optim.num_steps": 6, "log.every_steps": 1,
                              "ckpt.every_steps": 1})  # fmt: skip
    return config, str(tmp_path / "run")


RUN_CASES = [
    Bad("workdir-unwritable", _unwritable,
        r"--workdir: .*/a_file/run cannot be created: .*/a_file is a file, not a directory$"),
    Bad("workdir-other-config", _other_config,
        r"config\.model\.name: is 'cnn' but the workdir holds a run with 'teacher_cnn'; use a "
        r"new --workdir or the original config$"),
    Bad("checkpoint-other-shapes", _foreign_checkpoints,
        r"checkpoint .*/checkpoints/2 holds another run's state \(\S+ (has shape \(.*\) there "
        r"but \(.*\) here|is in the checkpoint but not in this config's state)\); use a new "
        r"--workdir, or the config that wrote it$",
        config_error=False),
    Bad("checkpoint-other-optimizer", _other_optimizer_state,
        r"checkpoint .*/checkpoints/2 holds another run's state \(opt_state/\S+ is in the "
        r"checkpoint but not in this config's state\); use a new --workdir", config_error=False),
    Bad("checkpoint-truncated", _truncated_checkpoint,
        r"checkpoint .*/checkpoints/2 is damaged \(corrupt or truncated: .*\); delete "
        r".*/checkpoints/2 to resume from step 1$", config_error=False),
    Bad("checkpoint-garbled", _garbled_checkpoint_metadata,
        r"checkpoint .*/checkpoints/2 is damaged \(corrupt or truncated: .*\); delete "
        r".*/checkpoints/2 to resume from step 1$", config_error=False),
    Bad("dataset-offline", _offline_dataset,
        r"Dataset 'cifar10' is not prepared in .*/tfds.* python -m ptq_adversary\.data "
        r"--prepare cifar10 --data_dir DIR .* data\.data_dir=DIR", config_error=False),
    Bad("fashion-mnist-missing", _missing_fashion_mnist,
        r"Fashion-MNIST not found: .*/nowhere' lacks train-images-idx3-ubyte\.gz.* apt-get "
        r"install -y dataset-fashion-mnist", config_error=False),
    Bad("images-non-finite", _constant_images,
        r"dataset_stats: mean must be finite and std finite and > 0 per channel, got mean "
        r"\[0\.0\], std \[0\.0\] \(a constant channel\?\)$", config_error=False),
    Bad("stage-input-missing", _missing_teacher,
        r"no artifact \(spec\.json\) in .*/run/teacher/model$", config_error=False),
    Bad("loss-non-finite", _diverging,
        r"training diverged: non-finite train metric\(s\) \[.*'loss'.*\] at step \d+ \(first at "
        r"step \d+\)(; removed the later checkpoints \[[\d, ]+\])?; the last good checkpoint is "
        r"step \d+ \(.*/checkpoints/\d+\); lower optim\.learning_rate and rerun to resume from it",
        status=1, config_error=False),
]  # fmt: skip


def _run_case(case: Bad, tmp_path, request, capsys) -> tuple[str, str]:
    config, workdir = case.make(tmp_path, request)
    before = _snapshot(workdir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.execute(config, workdir)
    assert exit_info.value.code == case.status
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.match("error: " + case.expected, lines[0]), lines[0]
    if case.config_error:
        assert _snapshot(workdir) == before
    return lines[0], workdir


def test_catalogue_has_at_least_20_distinct_entries():
    ids = [c.id for c in CONFIG_CASES + RUN_CASES]
    assert len(ids) == len(set(ids)) >= 20


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_config_error(case, tmp_path, request, capsys):
    _run_case(case, tmp_path, request, capsys)


@requires_fashion_mnist
@pytest.mark.parametrize("case", RUN_CASES, ids=lambda c: c.id)
def test_run_error(case, tmp_path, request, capsys):
    start = time.perf_counter()
    line, workdir = _run_case(case, tmp_path, request, capsys)
    if case.id == "dataset-offline":
        assert time.perf_counter() - start < 5.0  # not tfds's minutes of download retries
    if case.id == "loss-non-finite":
        # The run stopped at the first bad step; the checkpoint it names is on disk, finite,
        # and the newest one (nothing non-finite was saved).
        bad_step, good_step = map(
            int, re.search(r"first at step (\d+)\).* checkpoint is step (\d+) ", line).groups()
        )
        assert good_step < bad_step
        with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
            assert ckpt.latest_step() == good_step
        # The advice works: with a sane learning rate the same workdir resumes and finishes.
        config, _ = _diverging(tmp_path, request)
        with config.unlocked():
            config.optim.learning_rate = 1e-3
        assert supervised.train_and_evaluate(config, workdir)["resumed_from_step"] == good_step


def test_verbose_shows_the_original_exception(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.name"):
        cli.execute(_config(_CNN, **{"model.name": "x"}), str(tmp_path / "run"), verbose=True)


def test_batch_not_divisible_by_devices_in_process():
    config = _config(_CNN, **{"optim.batch_size": 30})
    config_lib.validate(config, num_devices=1)
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.batch_size: must be "
                       r"divisible by the number of devices \(4\), got 30"):  # fmt: skip
        config_lib.validate(config, num_devices=4)


def test_non_finite_float_images_are_named():
    images = np.zeros((4, 8, 8, 1), np.float32)
    images[2, 3, 3, 0] = np.nan
    images[3, 0, 0, 0] = np.inf
    with pytest.raises(data.NonFiniteInputError, match=r"images: 2 of 256 values are NaN or "
                       r"inf \(first in example 2\); input images must be finite"):  # fmt: skip
        data.normalize(images, np.zeros(1), np.ones(1))
    data.check_finite_images(np.zeros((2, 3), np.uint8))  # integers are always finite
    with pytest.raises(data.NonFiniteInputError, match="dataset_stats"):
        data.normalize(np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1), np.asarray([np.nan]))


@requires_fashion_mnist
def test_incomplete_checkpoints_are_never_picked_up(tmp_path, request):
    workdir = _copy_trained(tmp_path, request)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # A step directory without orbax's commit marker, and a killed save's temporary directory.
    shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "3"))
    os.remove(os.path.join(ckpt_dir, "3", "commit_success.txt"))
    os.makedirs(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp-1234", "state"))
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    assert any(name.startswith("3.incomplete-") for name in os.listdir(ckpt_dir))


def test_damaged_checkpoint_fix_works(tmp_path, request, capsys):
    """Following the message (delete the damaged step) resumes from the step before it."""
    case = next(c for c in RUN_CASES if c.id == "checkpoint-truncated")
    line, workdir = _run_case(case, tmp_path, request, capsys)
    shutil.rmtree(re.search(r"delete (\S+) to resume", line).group(1))
    results = supervised.train_and_evaluate(_config(_CNN, **{"optim.num_steps": 2}), workdir)
    assert results["resumed_from_step"] == 1


# ------------------------------------------------------------------ the real command line
def _cli(*args: str, devices: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    return subprocess.run([sys.executable, "-m", "ptq_adversary.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _assert_one_error_line(proc, status: int, expected: str) -> None:
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match("error: " + expected, errors[0]), proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[0])  # nothing after it (no exit-time noise)


def test_cli_batch_not_divisible_by_four_devices(tmp_path):
    workdir = tmp_path / "run"
    proc = _cli("--config=configs/fmnist_cnn.py:smoke", f"--workdir={workdir}",
                "--config.optim.batch_size=30", devices=4)  # fmt: skip
    _assert_one_error_line(proc, 2, r"config\.optim\.batch_size: must be divisible by the number "
                           r"of devices \(4\), got 30$")  # fmt: skip
    assert proc.stderr.count("\n") == 1 and not workdir.exists()


def test_cli_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _cli("--config=configs/fmnist_cnn.py:smoke", f"--workdir={tmp_path}/file/run")
    _assert_one_error_line(proc, 2, r"--workdir: .* is a file, not a directory$")
    assert proc.stderr.count("\n") == 1


@requires_fashion_mnist
def test_cli_damaged_checkpoint_and_offline_dataset(tmp_path, request):
    workdir = _truncated_checkpoint(tmp_path, request)[1]
    proc = _cli("--config=configs/fmnist_cnn.py:smoke", f"--workdir={workdir}",
                "--config.optim.num_steps=2")  # fmt: skip
    _assert_one_error_line(proc, 2, r"checkpoint .*/2 is damaged .* resume from step 1$")
    (tmp_path / "tfds").mkdir()
    proc = _cli("--config=configs/fmnist_cnn.py:smoke", f"--workdir={tmp_path}/offline",
                "--config.data.name=cifar10",
                f"--config.data.data_dir={tmp_path}/tfds")  # fmt: skip
    _assert_one_error_line(proc, 2, r"Dataset 'cifar10' is not prepared .* --prepare cifar10")


def test_cli_multihost_without_a_cluster():
    proc = _cli("--config=configs/fmnist_cnn.py:smoke", "--workdir=/nonexistent/x", "--multihost")
    _assert_one_error_line(proc, 2, r"--multihost: jax\.distributed\.initialize failed \(.*\); "
                           r"outside Cloud TPU, Slurm, Open MPI and Kubernetes pass "
                           r"--coordinator_address, --num_processes and --process_id$")  # fmt: skip
