"""experiments/accelerator_check.sh: its CPU dry run goes through every phase and reports.

The dry run runs tests/test_quant.py, every benchmark item at tiny sizes and a 2-step
pipeline with one pair, all on the cnn (the ResNet-18 is the GPU run's).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, requires_fashion_mnist


@requires_fashion_mnist
@pytest.mark.integration
def test_accelerator_check_cpu_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", "experiments/accelerator_check.sh", "--cpu-dry-run", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),  # the venv's python, not PATH's python3
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and report["device"]["backend"] == "cpu"
    assert report["tests"]["status"] == "passed" and report["tests"]["counts"]["passed"] > 0
    for item in ("policies", "static", "certify", "stage_b", "memory"):
        result = report["bench"][item]
        assert "error" not in result, (item, result.get("error"), result.get("traceback"))
        assert result["rows"], item
    # certify's exact worst case on the cnn equals exhaustive's
    rows = {r["method"]: r for r in report["bench"]["certify"]["rows"] if r["model"] == "cnn"}
    assert rows["certify"]["equal"] and rows["certify"]["exact"]
    assert report["phases"]["pair"]["status"] == "done", report["phases"]
    assert set(report["pair"]["pairs"]) == {"detrimental"}  # the dry run trains one pair
    assert set(report["suggested_tuning"]) == {
        "backend.POLICY_CHUNK_EXAMPLES", "backend.GRAD_CHUNK_EXAMPLES"
    }  # fmt: skip
    text = (out / "report.md").read_text()
    assert "# Accelerator check (CPU dry run" in text and "## Suggested tuning entries" in text
