"""Validation by the registry: each trainer's rules, bad values named, unknown trainers listed."""

import pytest

from ptq_adversary import config as config_lib
from ptq_adversary import training
from tests.helpers import REPO, load_config


def _smoke():
    return load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")


def test_every_trainer_registers_its_rules():
    assert config_lib.registered() == tuple(sorted(training.TRAINERS))
    assert config_lib.registration("supervised").rules == training.supervised.RULES
    assert training.checks.check_pair_budget in config_lib.registration("policy_aware").checks


def test_unknown_trainer_lists_the_registered_ones():
    config = _smoke()
    config.trainer = "magic"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^config\.trainer: must be one of \['audit', 'distill', 'pipeline', "
        r"'policy_aware', 'supervised'\], got 'magic'$",
    ):
        config_lib.validate(config)


def test_a_trainer_registers_once():
    with pytest.raises(ValueError, match="'supervised' is registered already"):
        config_lib.register("supervised", training.supervised.RULES)


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
        ("optim.optimizer", "sgd", r"config\.optim\.momentum: is missing \(optimizer 'sgd'"),
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


def test_momentum_with_adamw_is_rejected_also_in_a_pipeline_stage():
    config = _smoke()
    config.optim.momentum = 0.9
    with pytest.raises(config_lib.ConfigError, match=r"^config\.optim\.momentum: is read by "):
        config_lib.validate(config)
    config = load_config(REPO / "configs" / "fmnist_pair.py", "smoke")
    config.pairs.optim.momentum = 0.9
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^config\.pairs\.optim\.momentum: is read by optimizer 'sgd' only; remove it "
        r"with optimizer 'adamw', got 0\.9 \(stage robust\)$",
    ):
        config_lib.validate(config)


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
