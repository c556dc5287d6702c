"""Saved configs: a workdir binds only the fields that fix checkpoint shapes."""

import pytest

from ptq_adversary import config as config_lib
from tests.helpers import REPO, load_config


def _smoke():
    return load_config(REPO / "configs" / "fmnist_cnn.py", "smoke")


def test_compare_with_saved_rejects_a_different_model():
    config = _smoke()
    saved = config_lib.to_dict(config)
    config_lib.compare_with_saved(config, saved)  # same config: fine
    saved["model"]["name"] = "cnn"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.name: is 'teacher_cnn' but"):
        config_lib.compare_with_saved(config, saved)


def test_a_saved_config_with_fields_removed_since_still_resumes():
    """A run dir started before the dead fields went (adamw with ``momentum``, stage A and B
    with ``label_smoothing``) is resumable with today's configs."""
    for name in ("fmnist_cnn", "fmnist_pair"):
        config = load_config(REPO / "configs" / f"{name}.py", "smoke")
        saved = config_lib.to_dict(config)
        for optim in (saved.get("optim"), *(saved.get(s, {}).get("optim") for s in
                                            ("teacher", "student", "pairs"))):  # fmt: skip
            if optim is not None:
                optim.update(momentum=0.9, label_smoothing=0.0)
        config_lib.compare_with_saved(config, saved)


def test_to_dict_is_json_ready():
    config = _smoke()
    plain = config_lib.to_dict(config)
    assert plain["eval"]["uniform_bits"] == [8, 6, 4] and plain["model"]["name"] == "teacher_cnn"
