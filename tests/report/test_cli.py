"""The report's command line: exit status and messages."""

import subprocess
import sys

import pytest

from ptq_adversary import report
from tests.helpers import REPO


def test_command_line_reports_a_missing_workdir(tmp_path, capsys):
    assert report.main([f"--workdir={tmp_path}"]) == 2
    assert "no finished pipeline run" in capsys.readouterr().err


def test_command_line_takes_a_run_layout(tmp_path, capsys):
    assert report.main([f"--workdir={tmp_path}", "--runs=lr_{}"]) == 2
    assert f"{tmp_path}/lr_*/results.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        report.main([f"--workdir={tmp_path}", "--runs=lr"])
    assert exit_info.value.code == 2
    assert "exactly one '{}'" in capsys.readouterr().err


def test_python_dash_m_runs_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ptq_adversary.report", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no finished pipeline run" in proc.stderr
