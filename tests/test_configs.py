"""Config files load, validate, and bad values are rejected with a message naming the field."""

import ml_collections
import pytest

from ptq_adversary import config_lib
from tests.helpers import CONFIG_FILES, REPO, load_config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_config_loads_and_validates(path, arg):
    config = load_config(path, arg)
    config.lock()  # as the command line (lock_config=True) hands it over
    config_lib.validate(config)
    assert config.trainer
    doc = path.read_text()
    assert "python -m ptq_adversary.main --config=configs/" in doc  # the exact command


def test_config_files_exist():
    names = {p.stem for p in CONFIG_FILES}
    assert {"fmnist_cnn", "cifar10_resnet18"} <= names


def _smoke():
    return load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.name", "resnet99", r"config\.model\.name: must be one of \[.*'cnn'"),
        ("data.name", "imagenet", r"config\.data\.name: must be one of .*'fashion_mnist'"),
        ("optim.learning_rate", -1.0, r"config\.optim\.learning_rate: must be > 0"),
        ("optim.learning_rate", 0.0, r"config\.optim\.learning_rate: must be > 0"),
        ("optim.batch_size", 0, r"config\.optim\.batch_size: must be > 0"),
        ("optim.optimizer", "lion", r"config\.optim\.optimizer: must be one of"),
        ("optim.num_steps", -5, r"config\.optim\.num_steps: must be > 0"),
        ("model.weight_bits", 1, r"config\.model\.weight_bits: must be an int in \[2, 16\]"),
        ("model.weight_bits", 17, r"config\.model\.weight_bits"),
        ("eval.uniform_bits", (8, 40), r"config\.eval\.uniform_bits: entries must be an int"),
        ("optim.warmup_fraction", 1.5, r"config\.optim\.warmup_fraction: must be in \[0, 1\)"),
        ("data.val_size", 0, r"config\.data\.val_size: must be > 0"),
        ("trainer", "magic", r"config\.trainer: must be one of"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value, match):
    config = _smoke()
    with config.unlocked():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match) as err:
        config_lib.validate(config)
    assert "\n" not in str(err.value)


def test_unknown_model_kwarg_is_rejected():
    config = _smoke()
    config.model.kwargs.depth = 3
    with pytest.raises(config_lib.ConfigError, match=r"model\.kwargs\.depth: is not an argument"):
        config_lib.validate(config)


def test_batch_size_must_divide_by_devices():
    config = _smoke()
    config.optim.batch_size = 30
    with pytest.raises(config_lib.ConfigError, match="divisible by the number of devices"):
        config_lib.validate(config, num_devices=4)


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg("smoke,epochs=2.5,model=cnn", smoke=False, epochs=1.0, model="x")
    assert arg.smoke is True and arg.epochs == 2.5 and arg.model == "cnn"
    assert config_lib.parse_arg(None, smoke=False).smoke is False
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budgt: unknown config arg"):
        config_lib.parse_arg("budgt=4", budget=4)
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budget: expected int"):
        config_lib.parse_arg("budget=four", budget=4)


def test_compare_with_saved_rejects_a_different_model():
    config = _smoke()
    saved = config_lib.to_dict(config)
    config_lib.compare_with_saved(config, saved)  # same config: fine
    saved["model"]["name"] = "cnn"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.name: is 'teacher_cnn' but"):
        config_lib.compare_with_saved(config, saved)


def test_locked_config_rejects_misspelt_fields():
    config = _smoke()
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
