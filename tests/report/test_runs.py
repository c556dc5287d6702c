"""Run discovery: the default seeds layout, another layout, a single run, no run."""

import os

import pytest

from ptq_adversary import report


def test_find_runs_orders_seeds_numerically_and_accepts_a_single_run(tmp_path):
    for s in (10, 2):
        os.makedirs(tmp_path / f"seed_{s}")
        (tmp_path / f"seed_{s}" / "results.json").write_text("{}")
    assert list(report.find_runs(str(tmp_path))) == ["seed_2", "seed_10"]
    single = tmp_path / "seed_2"
    assert report.find_runs(str(single)) == {"seed_2": str(single)}
    with pytest.raises(FileNotFoundError, match="results.json"):
        report.find_runs(str(tmp_path / "nowhere"))


def test_find_runs_takes_another_layout(tmp_path):
    for name in ("lr_3", "lr_20", "seed_0"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "results.json").write_text("{}")
    os.makedirs(tmp_path / "lr_7")  # unfinished: not a run
    layout = report.RunLayout("lr_{}")
    assert list(report.find_runs(str(tmp_path), layout)) == ["lr_3", "lr_20"]
    assert list(report.find_runs(str(tmp_path))) == ["seed_0"]  # the default: seed_*
    with pytest.raises(FileNotFoundError, match=r"nowhere/results.json or .*/nowhere/lr_\*/"):
        report.find_runs(str(tmp_path / "nowhere"), layout)


def test_run_layout_names_and_paths():
    layout = report.RunLayout("seed_{}")
    assert layout == report.SEEDS_LAYOUT == report.RunLayout()
    assert layout.pattern == "seed_*" and layout.run_name(3) == "seed_3"
    assert layout.run_dir("runs/seeds", 3) == os.path.join("runs/seeds", "seed_3")
    for bad in ("seed", "a_{}_{}", "x/{}", "{0}_{}"):
        with pytest.raises(ValueError, match="exactly one"):
            report.RunLayout(bad)


def test_run_modes_in_report_order(tmp_path):
    (tmp_path / "results.json").write_text('{"pairs": {"detrimental": {}, "robust": {}}}')
    assert report.run_modes(str(tmp_path)) == ["robust", "detrimental"]
    (tmp_path / "results.json").write_text('{"pairs": {"detrimental": {}}}')
    assert report.run_modes(str(tmp_path)) == ["detrimental"]
