"""The audit command (configs/audit.py through ptq_adversary.training.audit): its config is
validated, it runs on a pipeline source and on a user factory model."""

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
def test_audit_command_smoke(tmp_path):
    config = load_config(REPO / "configs" / "audit.py", "smoke")
    summary = audit_trainer.run_audit(config, str(tmp_path))
    assert summary["num_examples"] == 64 and summary["num_allocations"] == 109
    for name in ("audit.json", "examples.csv", "summary.md", "results.json",
                 "accuracy_by_method.png"):  # fmt: skip
        assert (tmp_path / name).exists(), name
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
