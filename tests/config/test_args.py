"""Config-file arguments: parse_arg's types and errors, load_config_file."""

import pytest

from ptq_adversary import config as config_lib
from tests.helpers import REPO


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg("smoke,epochs=2.5,model=cnn", smoke=False, epochs=1.0, model="x")
    assert arg.smoke is True and arg.epochs == 2.5 and arg.model == "cnn"
    assert config_lib.parse_arg(None, smoke=False).smoke is False
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budgt: unknown config arg"):
        config_lib.parse_arg("budgt=4", budget=4)
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budget: expected int"):
        config_lib.parse_arg("budget=four", budget=4)


def test_parse_arg_bools_tuples_and_bare_keys():
    arg = config_lib.parse_arg("flag=no,widths=[4]", flag=True, widths=(1, 2))
    assert arg.flag is False and arg.widths == (4,)
    with pytest.raises(config_lib.ConfigError, match=r"arg\.flag: expected true/false"):
        config_lib.parse_arg("flag=maybe", flag=True)
    with pytest.raises(config_lib.ConfigError, match=r"arg\.budget: needs a value"):
        config_lib.parse_arg("budget", budget=4)


def test_load_config_file_runs_get_config_with_the_arg():
    config = config_lib.load_config_file(str(REPO / "configs" / "fmnist_cnn.py"), "model=cnn")
    assert config.trainer == "supervised" and config.model.name == "cnn"
