"""Rule primitives and the shared sections' cross-field checks."""

import math

import pytest

from ptq_adversary import config as config_lib
from tests.helpers import REPO, load_config


def test_value_checks_accept_and_name_what_is_allowed():
    assert config_lib.positive(int)(3) is None and config_lib.positive(float)(2) is None
    assert config_lib.positive(int)(True) == "must be a int > 0, got True"
    assert config_lib.positive(float)(math.inf) == "must be a finite number > 0, got inf"
    assert config_lib.one_of(("b", "a"))("c") == "must be one of ['a', 'b'], got 'c'"
    assert config_lib.at_least(2, "why")(1) == "must be an int >= 2 (why), got 1"
    assert config_lib.bits(17) == "must be an int in [2, 16] or None, got 17"
    assert config_lib.bit_list((8, 40)) == "entries must be an int in [2, 16], got 40"
    assert config_lib.bit_choices((2, 4)) is None and "sorted" in config_lib.bit_choices((4, 2))
    assert config_lib.fraction(1.0) == "must be in [0, 1), got 1.0"
    assert config_lib.must_be_false("r")(True) == "must be False (r), got True"
    assert config_lib.positive_ints((4, 0)) == "must be a list of positive ints, got (4, 0)"
    assert config_lib.boolean(1) == "must be True or False, got 1"


def test_check_rules_skips_optional_none_and_names_missing_fields():
    config = load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")
    config_lib.check_rules(config, [config_lib.Rule("optim.num_steps", config_lib.bits, True)])
    with pytest.raises(config_lib.ConfigError, match=r"^config\.optim\.lr: is missing$"):
        config_lib.check_rules(config, [config_lib.Rule("optim.lr", config_lib.fraction)])


def _optim(optimizer, **fields):
    config = load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")
    config.optim.optimizer = optimizer
    for key, value in fields.items():
        config.optim[key] = value
    return config


def test_momentum_is_read_by_sgd_only():
    config_lib.check_optimizer(_optim("adamw"))  # fmnist_cnn: adamw, no momentum
    config_lib.check_optimizer(_optim("adamw", momentum=None))  # an unset placeholder
    config_lib.check_optimizer(_optim("sgd", momentum=0.9))
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^config\.optim\.momentum: is read by optimizer 'sgd' only; remove it with "
        r"optimizer 'adamw', got 0\.9$",
    ):
        config_lib.check_optimizer(_optim("adamw", momentum=0.9))
    with pytest.raises(config_lib.ConfigError, match=r"momentum: is missing \(optimizer 'sgd'"):
        config_lib.check_optimizer(_optim("sgd"))
    with pytest.raises(config_lib.ConfigError, match=r"momentum: must be in \[0, 1\), got 1\.5"):
        config_lib.check_optimizer(_optim("sgd", momentum=1.5))
