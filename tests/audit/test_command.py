"""The audit command (configs/audit.py through ptq_adversary.training.audit): its config is
validated, it runs on a pipeline source and on a user factory model."""

import csv
import json

import pytest

from ptq_adversary import config as config_lib
from ptq_adversary.training import audit as audit_trainer
from tests.helpers import REPO, load_config, requires_fashion_mnist


def test_audit_config_validates_and_rejects_bad_fields():
    config = load_config(REPO / "configs" / "audit.py", "smoke")
    config_lib.validate(config)
    for field, value, match in [
        ("audit.methods", ("uniform", "oracle"), "audit.methods"),
        ("source.kind", "pair", "source.kind"),
        ("audit.num_moves", 0, "audit.num_moves"),
        ("audit.choices", (4, 2), "audit.choices"),
    ]:
        bad = load_config(REPO / "configs" / "audit.py", "smoke")
        with bad.unlocked():
            section, key = field.rsplit(".", 1)
            bad[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(bad)


@requires_fashion_mnist
@pytest.mark.integration
def test_audit_command_smoke_with_certify_and_a_bracket_sweep(tmp_path, capsys):
    """The audit command with every method and a bracket sweep over two new budgets and the
    main one (reused): the files agree, and every bracket is ordered (proved <= found <= each
    search)."""
    config = load_config(REPO / "configs" / "audit.py", "smoke,budgets=5/3/4")
    with config.unlocked():
        config.audit.num_examples = 32
    summary = audit_trainer.run_audit(config, str(tmp_path))
    assert summary["num_examples"] == 32 and summary["num_allocations"] == 109
    for name in ("audit.json", "examples.csv", "summary.md", "results.json",
                 "accuracy_by_method.png", "bracket_vs_budget.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    cert = results["methods"]["certify"]
    searches = ("uniform", "random_search", "greedy", "beam")
    assert 0 <= cert["certified_accuracy"] <= cert["accuracy"]
    assert cert["accuracy"] <= min(results["methods"][m]["accuracy"] for m in searches)
    assert sum(cert["states"].values()) == 32 and cert["nodes"] > 0

    brackets = json.loads((tmp_path / "brackets.json").read_text())
    assert brackets["methods"] == [
        m for m in config.audit.methods if m not in ("policy", "exhaustive")
    ]
    rows = brackets["rows"]
    assert [r["budget"] for r in rows] == [3.0, 4.0, 5.0] and results["brackets"] == rows
    for r in rows:
        assert set(r["searches"]) >= {"uniform", "greedy"}
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
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Certified bracket vs budget" in markdown and "| 3 | 35 |" in markdown
    assert "| 3 | 35 |" in capsys.readouterr().out  # the bracket table is printed too

    # A missing pipeline source is a config error naming the field, before any work.
    with config.unlocked():
        config.source.kind = "student"
        config.source.pipeline_dir = str(tmp_path / "nowhere")
    with pytest.raises(config_lib.ConfigError, match="source.pipeline_dir"):
        audit_trainer.run_audit(config, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_audit_command_on_a_user_factory_model(tmp_path):
    """The audit CLI on a user's own architecture, built from an import path."""
    config = load_config(REPO / "configs" / "audit.py", "smoke")
    with config.unlocked():
        config.model.name = "small_net"
        config.model.factory = "tests.user_model:build"
        config.model.kwargs = type(config.model.kwargs)({"width": 4})
        config.audit.methods = ("uniform", "random", "exhaustive")
    summary = audit_trainer.run_audit(config, str(tmp_path))
    assert summary["site_names"] == ["conv2", "head"]
    assert summary["num_allocations"] == 5  # (2, 6), (3, 5), (4, 4), (5, 3), (6, 2)
    with config.unlocked():
        config.model.factory = "tests.user_model:no_such_function"
    with pytest.raises(config_lib.ConfigError, match="model.factory.*no function"):
        audit_trainer.run_audit(config, str(tmp_path / "other"))
