"""The config checks that build the model: sites from shapes for the data's real classes and
channels, and the one budget-feasibility check."""

import ml_collections
import pytest

from ptq_adversary import config as config_lib
from ptq_adversary import data
from ptq_adversary.training import checks
from tests import user_model
from tests.helpers import requires_fashion_mnist

SEEN: list[tuple[int, int]] = []  # (num_classes, in_channels) of each recording_build call


def recording_build(*, num_classes, in_channels, rngs, width=4):
    """tests.user_model.build, recording what it was asked to build."""
    SEEN.append((num_classes, in_channels))
    return user_model.build(num_classes=num_classes, in_channels=in_channels, rngs=rngs,
                            width=width)  # fmt: skip


def _config(dataset, factory="tests.training.test_checks:recording_build", name="small_net"):
    return ml_collections.ConfigDict({
        "data": {"name": dataset},
        "model": {"name": name, "factory": factory, "kwargs": {"width": 4}, "weight_bits": 8},
        "quant": {"choices": (2, 4, 8), "budget": 4.0},
    })  # fmt: skip


@pytest.mark.parametrize("dataset, expected", [("cifar100", (100, 3)), ("fashion_mnist", (10, 1))])
def test_abstract_num_sites_builds_for_the_datasets_classes_and_channels(dataset, expected):
    SEEN.clear()
    assert checks.abstract_num_sites(_config(dataset)) == 2  # conv2 and head
    assert SEEN == [expected]


def test_every_dataset_has_its_shape_and_class_count_without_loading():
    assert set(data.DATASETS) == set(data.IMAGE_SHAPES) == set(data.NUM_CLASSES)


@requires_fashion_mnist
def test_the_class_count_and_shape_tables_agree_with_the_loaded_data():
    dataset = data.load_dataset("fashion_mnist", val_size=10, train_limit=64, test_limit=16)
    assert dataset.num_classes == data.NUM_CLASSES["fashion_mnist"]
    assert tuple(dataset.image_shape) == data.IMAGE_SHAPES["fashion_mnist"]


def test_check_budgets_names_the_first_infeasible_field():
    config = _config("fashion_mnist")
    checks.check_pair_budget(config)  # 2 sites, choices {2, 4, 8}: 4 is feasible
    checks.check_budgets(config, (2, 4, 8), [("a", 3.0), ("b", 5.0)])
    with pytest.raises(config_lib.ConfigError, match=r"^config\.b: budget 2\.5 is infeasible"):
        checks.check_budgets(config, (2, 4, 8), [("a", 3.0), ("b", 2.5)])
    # Known sites (a trained artifact's) are used as they are: nothing is built.
    SEEN.clear()
    with pytest.raises(config_lib.ConfigError, match=r"^config\.a: budget 3 is infeasible for L=1"):
        checks.check_budgets(config, (2, 4, 8), [("a", 3.0)], num_sites=1)
    assert SEEN == []


def test_check_model_names_unknown_models_and_kwargs():
    checks.check_model(_config("fashion_mnist"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.name: must be one of"):
        checks.check_model(_config("fashion_mnist", factory="", name="resnet99"))
    config = _config("fashion_mnist")
    config.model.kwargs.depth = 2
    with pytest.raises(config_lib.ConfigError, match=r"model\.kwargs\.depth: is not an argument"):
        checks.check_model(config)
