"""Tests for ptq_adversary.data.cli: ``--info`` and ``--prepare``."""

import subprocess
import sys

from ptq_adversary import data
from ptq_adversary.data import cli, tfds_source
from tests.data.fakes import write_fake_fashion
from tests.helpers import REPO


def test_cli_info_and_prepare(tmp_path, capsys, monkeypatch):
    write_fake_fashion(tmp_path)
    assert (
        data.main(["--info", "fashion_mnist", "--data_dir", str(tmp_path), "--val_size", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "train        36" in out and "val          4" in out and "test         12" in out
    assert data.main(["--prepare", "fashion_mnist", "--data_dir", str(tmp_path)]) == 0
    monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port, timeout=3.0: False)
    assert data.main(["--prepare", "cifar10", "--data_dir", str(tmp_path / "tfds")]) == 1
    assert "--prepare cifar10" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli_described_by_the_package_docstring():
    assert cli.DESCRIPTION == data.__doc__.splitlines()[0]
    proc = subprocess.run([sys.executable, "-m", "ptq_adversary.data", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m ptq_adversary.data")
    assert cli.DESCRIPTION in proc.stdout and "--prepare NAME" in proc.stdout
