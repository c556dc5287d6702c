"""The command line: bad input exits non-zero with one line naming the field, writing nothing."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, requires_fashion_mnist


def _run(*args, timeout=120):
    env = dict(os.environ, TQDM_DISABLE="1", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "ptq_adversary.main", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.optim.learning_rate=-1", "error: config.optim.learning_rate: must be > 0"),
        ("--config.model.name=resnet99", "error: config.model.name: must be one of"),
        ("--config.model.weight_bits=1", "error: config.model.weight_bits: must be an int in"),
    ],
)
def test_bad_config_value_one_line_error_and_untouched_workdir(tmp_path, override, expected):
    workdir = tmp_path / "run"
    proc = _run("--config=configs/fmnist_cnn.py:smoke", f"--workdir={workdir}", override)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_bad_config_arg_and_misspelt_field(tmp_path):
    proc = _run("--config=configs/fmnist_cnn.py:smok", f"--workdir={tmp_path / 'a'}")
    assert proc.returncode != 0 and "arg.smok: unknown config arg" in proc.stderr
    proc = _run("--config=configs/fmnist_cnn.py:smoke", f"--workdir={tmp_path / 'b'}",
                "--config.optim.learnig_rate=0.1")  # fmt: skip
    assert proc.returncode != 0 and "learnig_rate" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@requires_fashion_mnist
def test_smoke_run_from_the_command_line(tmp_path):
    proc = _run("--config=configs/fmnist_cnn.py:smoke", f"--workdir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.json").exists()


def test_pipeline_errors_name_the_field_as_the_user_spells_it(tmp_path):
    proc = _run("--config=configs/fmnist_pair.py:smoke", f"--workdir={tmp_path / 'a'}",
                "--config.pairs.optim.learning_rate=-1")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: config.pairs.optim.learning_rate: must be > 0, got -1.0 (stage robust)"
    )
    proc = _run("--config=configs/fmnist_pair.py:smoke", f"--workdir={tmp_path / 'b'}",
                "--config.optim.learning_rate=1")  # fmt: skip
    assert proc.returncode == 2 and "no config field 'optim'" in proc.stderr
    proc = _run("--config=configs/fmnist_pair.py:smoke,budget=4.3", f"--workdir={tmp_path / 'c'}")
    assert proc.returncode == 2 and "config.pairs.quant.budget: budget 4.3" in proc.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--config=configs/audit.py:smoke", "--config.audit.certify.node_limit=0"),
         "error: config.audit.certify.node_limit: must be > 0, got 0"),
        (("--config=configs/audit.py:smoke,budgets=4/4.3",),
         "error: config.audit.bracket_budgets: budget 4.3 is infeasible for L=4 sites"),
        (("--config=configs/audit.py:smoke,budgets=4/x",),
         "error: flag --config=configs/audit.py: config.arg.budgets: expected floats separated "
         "by '/' (e.g. budgets=4/5/6), got '4/x'"),
        (("--config=configs/audit.py:smoke,choices=4/5.5",),
         "error: flag --config=configs/audit.py: config.arg.choices: expected ints"),
    ],
)  # fmt: skip
def test_audit_command_rejects_bad_certify_and_bracket_settings(tmp_path, args, expected):
    """One line naming the field, nothing written (the other bad values:
    tests/config/test_configs.py)."""
    proc = _run(*args, f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not (tmp_path / "run").exists()


def test_helpshort_shows_the_usage_and_every_flag():
    proc = _run("--helpshort")
    assert "python -m ptq_adversary.main --config=configs/fmnist_cnn.py" in proc.stdout
    for flag in ("--config", "--workdir", "--[no]verbose", "--[no]multihost", "--process_id"):
        assert f"  {flag}:" in proc.stdout, flag
