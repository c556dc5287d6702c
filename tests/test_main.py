"""The command line: bad input exits non-zero with one line naming the field, writing nothing."""

import csv
import json
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


@requires_fashion_mnist
@pytest.mark.integration
def test_audit_command_certify_and_bracket_sweep(tmp_path):
    """The audit CLI with certify and a bracket sweep over two new budgets and the main one
    (reused): files agree, and every bracket is ordered (proved <= found <= each search)."""
    proc = _run("--config=configs/audit.py:smoke,budgets=5/3/4", f"--workdir={tmp_path}",
                "--config.audit.methods=('uniform','greedy','certify')",
                "--config.audit.num_examples=32", timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    cert = results["methods"]["certify"]
    assert 0 <= cert["certified_accuracy"] <= cert["accuracy"]
    assert cert["accuracy"] <= min(results["methods"][m]["accuracy"] for m in ("uniform", "greedy"))
    assert sum(cert["states"].values()) == 32 and cert["nodes"] > 0

    brackets = json.loads((tmp_path / "brackets.json").read_text())
    assert brackets["methods"] == ["uniform", "greedy", "certify"]
    rows = brackets["rows"]
    assert [r["budget"] for r in rows] == [3.0, 4.0, 5.0] and results["brackets"] == rows
    for r in rows:
        assert set(r["searches"]) == {"uniform", "greedy"}
        assert 0 <= r["certified_accuracy"] <= r["accuracy"] <= min(r["searches"].values())
        assert r["width_points"] == pytest.approx(
            100 * (r["accuracy"] - r["certified_accuracy"]), abs=1e-3
        )
        assert r["exact"] == (r["unknown"] == 0) == (r["width_points"] == 0)
        assert r["fp_accuracy"] == results["fp_accuracy"] and r["nodes"] > 0
    assert [r["num_allocations"] for r in rows] == [35, 109, 117]  # 4 sites, {2,...,8}
    main = rows[1]  # the main audit's, reused
    assert main["certified_accuracy"] == cert["certified_accuracy"]
    assert main["nodes"] == cert["nodes"]

    with open(tmp_path / "brackets.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(t["budget"]) for t in table] == [3.0, 4.0, 5.0]
    for t, r in zip(table, rows, strict=True):
        for key in ("certified_accuracy", "accuracy", "width_points"):
            assert float(t[key]) == pytest.approx(r[key], abs=1e-6), key
        assert float(t["greedy_accuracy"]) == pytest.approx(r["searches"]["greedy"], abs=1e-6)
        assert int(t["exact"]) == r["exact"]
    assert (tmp_path / "bracket_vs_budget.png").stat().st_size > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Certified bracket vs budget" in markdown and "| 3 | 35 |" in markdown
    assert "| 3 | 35 |" in proc.stdout  # the bracket table is printed too


def test_helpshort_shows_the_usage_and_every_flag():
    proc = _run("--helpshort")
    assert "python -m ptq_adversary.main --config=configs/fmnist_cnn.py" in proc.stdout
    for flag in ("--config", "--workdir", "--[no]verbose", "--[no]multihost", "--process_id"):
        assert f"  {flag}:" in proc.stdout, flag
