"""Tests for ptq_adversary.metrics: the JSON-lines log, its resume, NaN checks, progress bars."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ptq_adversary import metrics
from tests.helpers import REPO


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_writes_one_json_line_per_record_with_step_split_and_floats(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(np.int64(4), {"loss": jnp.float32(0.5), "acc": np.float64(0.25)})
    writer.write(4, {"accuracy": 1}, split="val")
    writer.close()
    assert _records(tmp_path) == [
        {"step": 4, "split": "train", "loss": 0.5, "acc": 0.25},
        {"step": 4, "split": "val", "accuracy": 1.0},
    ]
    assert type(_records(tmp_path)[1]["accuracy"]) is float  # an int metric is logged as float
    # Without resume_step a new writer appends.
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(8, {"loss": 0.125})
    writer.close()
    assert [r["step"] for r in _records(tmp_path)] == [4, 4, 8]


def test_each_record_is_on_disk_as_soon_as_it_is_written(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0})
    assert _records(tmp_path) == [{"step": 1, "split": "train", "loss": 1.0}]  # before close
    writer.close()


def test_resume_drops_later_records_and_a_line_cut_short(tmp_path):
    lines = [json.dumps({"step": s, "split": split, "loss": s / 10})
             for s in (2, 4, 6) for split in ("train", "val")]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 8, "split": "tr')  # killed mid-line
    writer = metrics.MetricWriter(str(tmp_path), resume_step=4, tensorboard=False)
    writer.write(6, {"loss": 0.25})
    writer.close()
    assert [(r["step"], r["split"]) for r in _records(tmp_path)] == [
        (2, "train"), (2, "val"), (4, "train"), (4, "val"), (6, "train"),
    ]  # fmt: skip
    assert _records(tmp_path)[-1]["loss"] == 0.25  # the new step 6, not the old one


def test_resume_drops_a_complete_last_record_without_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "train"}')
    metrics.MetricWriter(str(tmp_path), resume_step=5, tensorboard=False).close()
    assert _records(tmp_path) == [{"step": 1, "split": "train", "loss": 1.0}]


def test_resume_without_a_log_starts_one(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3, tensorboard=False)
    writer.write(4, {"loss": 2.0})
    writer.close()
    assert _records(tmp_path) == [{"step": 4, "split": "train", "loss": 2.0}]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises_naming_metric_split_and_step_after_logging_it(tmp_path, bad):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(metrics.NonFiniteError, match=r"non-finite val metric\(s\) \['loss'\] at "
                       r"step 7"):  # fmt: skip
        writer.write(7, {"acc": 0.5, "loss": jnp.float32(bad)}, split="val")
    writer.close()
    assert issubclass(metrics.NonFiniteError, FloatingPointError)
    (record,) = _records(tmp_path)  # the log shows the bad value
    assert record["acc"] == 0.5 and not np.isfinite(record["loss"])
    # A resumed writer still reads a log holding NaN/inf.
    metrics.MetricWriter(str(tmp_path), resume_step=7, tensorboard=False).close()
    assert len(_records(tmp_path)) == 1


def test_to_host_gives_python_floats():
    out = metrics.to_host({"a": jnp.float32(1.5), "b": jnp.int32(3), "c": np.float64(0.25)})
    assert out == {"a": 1.5, "b": 3.0, "c": 0.25}
    assert all(type(v) is float for v in out.values())


_BAR_SCRIPT = """
import io, json, sys
sys.stderr = io.StringIO()  # not a terminal
from ptq_adversary import metrics
bar = metrics.progress_bar(10, initial=3, desc="train")
bar.update(2)
off = metrics.progress_bar(10, disable=True)
# A disabled bar lacks the display attributes.
shown = {k: getattr(bar, k, None) for k in ("mininterval", "unit")}
print(json.dumps({"disable": bar.disable, "n": bar.n, "total": bar.total, "off": off.disable,
                  **shown}))
bar.close()
"""


@pytest.mark.parametrize("tqdm_disable", [None, "1"])
def test_progress_bar_counts_steps_and_obeys_disable_and_tqdm_disable(tqdm_disable):
    # A subprocess: tqdm reads TQDM_DISABLE once, when it is imported.
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if tqdm_disable:
        env["TQDM_DISABLE"] = tqdm_disable
    proc = subprocess.run([sys.executable, "-c", _BAR_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["off"] is True and out["total"] == 10
    if tqdm_disable:
        assert out["disable"] is True
    else:
        assert out["disable"] is False and out["n"] == 5 and out["unit"] == "step"
        assert out["mininterval"] == 30.0  # sparse updates off a terminal
