"""The config files: each loads and validates, its args parse, and its dead fields are gone."""

import ml_collections
import pytest

from ptq_adversary import config as config_lib
from ptq_adversary import training
from tests.helpers import CONFIG_FILES, REPO, load_config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_config_loads_and_validates(path, arg):
    config = load_config(path, arg)
    config.lock()  # as the command line (lock_config=True) hands it over
    config_lib.validate(config)
    assert config.trainer in training.TRAINERS
    doc = path.read_text()
    assert "python -m ptq_adversary.main --config=configs/" in doc  # the exact command


def test_config_files_exist():
    names = {p.stem for p in CONFIG_FILES}
    assert {"fmnist_cnn", "cifar10_resnet18"} <= names


def _optim_sections(config):
    """Every ``optim`` section of a config, pipeline stages' included, by dotted name."""
    sections = {"optim": config.get("optim")}
    for stage in ("teacher", "student", "pairs"):
        if stage in config:
            sections[f"{stage}.optim"] = config[stage].optim
    return {name: optim for name, optim in sections.items() if optim is not None}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_no_config_sets_a_field_no_trainer_reads(path):
    """``momentum`` only where the optimizer is sgd; ``label_smoothing`` only where the
    supervised trainer (the teacher, the audit's fresh model) reads it."""
    config = load_config(path, "smoke")
    for name, optim in _optim_sections(config).items():
        assert ("momentum" in optim) == (optim.optimizer == "sgd"), name
        read_by_supervised = name in ("optim", "teacher.optim")
        assert ("label_smoothing" in optim) == read_by_supervised, name


def test_locked_config_rejects_misspelt_fields():
    config = load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")
    config.lock()
    with pytest.raises(AttributeError):
        config.optim.learnig_rate = 1.0
    assert isinstance(config, ml_collections.ConfigDict)


def _audit(arg="smoke"):
    return load_config(REPO / "configs" / "audit.py", arg)


def test_audit_config_certify_and_bracket_args():
    config = _audit()
    assert "certify" in config.audit.methods and config.audit.bracket_budgets == ()
    assert config.audit.certify.bounds == "auto"
    assert _audit(None).audit.certify.node_limit is None  # no limits outside smoke
    config = _audit("smoke,budgets=3/4.5,choices=4/5/6/8")
    assert config.audit.bracket_budgets == (3.0, 4.5) and config.audit.choices == (4, 5, 6, 8)
    config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budgets: expected floats"):
        _audit("budgets=3/four")
    with pytest.raises(config_lib.ConfigError, match=r"config\.audit\.choices: must be a non"):
        config_lib.validate(_audit("choices=6/4"))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("audit.certify.node_limit", 0, r"config\.audit\.certify\.node_limit: must be > 0"),
        ("audit.certify.time_limit", 0.0, r"config\.audit\.certify\.time_limit: must be > 0"),
        ("audit.certify.bounds", "maybe",
         r"config\.audit\.certify\.bounds: must be one of \['auto', 'off', 'on'\]"),
        ("audit.bracket_budgets", (4.0, -1.0),
         r"config\.audit\.bracket_budgets: must be a list of mean budgets"),
        ("audit.bracket_budgets", (4.0, 4.0), r"config\.audit\.bracket_budgets: must not repeat"),
    ],
)  # fmt: skip
def test_audit_certify_and_bracket_fields_are_validated(field, value, match):
    config = _audit()
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match) as err:
        config_lib.validate(config)
    assert "\n" not in str(err.value)
