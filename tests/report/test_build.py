"""build_report on a tiny fake seeds workdir: files, numbers over seeds, caching."""

import csv
import json
import os

import numpy as np
import pytest

from ptq_adversary import analysis, report
from tests.analysis.fakes import make_fake_run, tiny_dataset

PNGS = (
    "accuracy_drops.png", "bit_histograms.png", "class_bits.png", "flip_vs_margin.png",
    "sensitivity.png", "corruptions.png", "corruption_drops.png", "corruption_examples.png",
)  # fmt: skip
CSVS = (
    "seeds.csv", "flip_by_margin.csv", "flip_by_class.csv", "flip_concentration.csv",
    "bit_histogram.csv", "class_mean_bits.csv", "allocation.csv", "sensitivity.csv",
    "sensitivity_lowest.csv", "corruptions.csv", "corruption_summary.csv",
)  # fmt: skip


@pytest.fixture(scope="module")
def seeds_report(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("seeds"))
    for seed in (0, 1):
        os.makedirs(os.path.join(workdir, f"seed_{seed}"))
        make_fake_run(os.path.join(workdir, f"seed_{seed}"), seed)
    os.makedirs(os.path.join(workdir, "seed_9"))  # unfinished: no results.json, not a run
    ds = tiny_dataset(n_test=30)
    path = report.build_report(
        workdir, corruption_names=["contrast", "translation"], batch_size=16,
        dataset_fn=lambda run_dir: ds,
    )  # fmt: skip
    return workdir, path


def test_report_writes_markdown_tables_and_plots(seeds_report):
    workdir, path = seeds_report
    out = os.path.dirname(path)
    assert path == os.path.join(workdir, "report", "report.md")
    text = open(path).read()
    for name in PNGS:
        assert os.path.getsize(os.path.join(out, name)) > 10_000, name  # a real image
        if name != "corruption_examples.png" or "corruption_examples" in text:
            assert f"({name})" in text, name
    for name in CSVS:
        with open(os.path.join(out, name)) as f:
            rows = list(csv.DictReader(f))
        assert rows, name
    for run in ("seed_0", "seed_1"):
        assert os.path.exists(os.path.join(out, run, "assessment.json"))
        assert os.path.exists(os.path.join(out, run, "per_input_robust.npz"))
    assert not os.path.exists(os.path.join(out, "seed_9"))
    assert "| metric | unit | mean ± 95% CI | seed_0 | seed_1 |" in text


def test_report_numbers_are_means_with_t_intervals_over_seeds(seeds_report):
    workdir, path = seeds_report
    out = os.path.dirname(path)
    seeds = json.load(open(os.path.join(out, "seeds.json")))
    m = seeds["metrics"]["detrimental_dptq_acc"]
    assert m["values"] == pytest.approx({"seed_0": 10.0, "seed_1": 11.0})
    # n = 2: t_{0.975, 1} = 12.706204736174705, std = 0.5 * sqrt(2).
    assert m["half_width"] == pytest.approx(12.706204736174705 * np.sqrt(0.5) / np.sqrt(2))
    with open(os.path.join(out, "seeds.csv")) as f:
        row = [r for r in csv.DictReader(f) if r["metric"] == "detrimental_dptq_acc"][0]
    assert float(row["mean"]) == pytest.approx(10.5)
    assert "10.50 ± 6.35" in open(path).read()
    # Corruption rows: severity 0 of each corruption is the clean row of every run.
    with open(os.path.join(out, "corruptions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["corruption"] for r in rows} == {"contrast", "translation"}
    assert {int(r["severity"]) for r in rows} == set(range(6))
    clean = [json.load(open(os.path.join(out, s, "corruptions.json")))["rows"][0]
             for s in ("seed_0", "seed_1")]  # fmt: skip
    zero = [r for r in rows if r["corruption"] == "contrast" and r["severity"] == "0"
            and r["pair"] == clean[0]["pair"]][0]  # fmt: skip
    assert float(zero["fp_acc_pct"]) == pytest.approx(
        100 * np.mean([c["fp_accuracy"] for c in clean]), abs=1e-4
    )


def test_report_reuses_cached_analyses(seeds_report, monkeypatch):
    workdir, path = seeds_report

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached analysis recomputed")

    monkeypatch.setattr(analysis, "assess_pair", must_not_run)
    monkeypatch.setattr(analysis, "evaluate_corruptions", must_not_run)
    before = os.path.getmtime(os.path.join(workdir, "report", "seed_0", "assessment.json"))
    report.build_report(workdir, corruption_names=["contrast", "translation"], batch_size=16,
                        dataset_fn=lambda run_dir: tiny_dataset(n_test=30))  # fmt: skip
    after = os.path.getmtime(os.path.join(workdir, "report", "seed_0", "assessment.json"))
    assert before == after
