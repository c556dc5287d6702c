"""Config checks that need the model and data registries: model arguments, budget feasibility.

:mod:`ptq_adversary.config` checks each field by itself; these checks, registered by the
trainers next to their rules, look at what the fields build:

* :func:`check_model`: ``model.name`` is in the registry (or ``model.factory`` importable)
  and ``model.kwargs`` are arguments it accepts.
* :func:`abstract_num_sites`: the quantization sites of ``config.model``, from shapes alone,
  for the dataset's real class count and image shape (``data.NUM_CLASSES``,
  ``data.IMAGE_SHAPES``); no weights are computed.
* :func:`check_budgets`: every budget is feasible for the model's sites and the choices (the
  one budget-feasibility check; stage B's :func:`check_pair_budget` and the audit use it).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import ml_collections
from flax import nnx

from ptq_adversary import artifacts, data, models, policy
from ptq_adversary import config as config_lib

__all__ = [
    "NETWORK_CHECKS",
    "abstract_num_sites",
    "check_budgets",
    "check_model",
    "check_pair_budget",
]


def check_model(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """``model.name`` in the registry (or ``model.factory`` importable), kwargs it accepts."""
    del num_devices  # a config_lib.ConfigCheck
    factory = config.model.get("factory") or None
    if factory:
        try:
            ctor = models.load_factory(factory)
        except ValueError as err:
            raise config_lib.ConfigError("model.factory", str(err)) from None
        where = f"factory {factory!r}"
    else:
        if config.model.name not in models.MODELS:
            raise config_lib.ConfigError(
                "model.name",
                f"must be one of {sorted(models.MODELS)}, got {config.model.name!r} (for your "
                "own model set model.factory='package.module:function')",
            )
        ctor = models.MODELS[config.model.name]
        where = f"model {config.model.name!r}"
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in config_lib.to_dict(config.model.get("kwargs", {})):
        if key not in params:
            allowed = [k for k in params if k not in ("num_classes", "in_channels", "rngs")]
            raise config_lib.ConfigError(
                f"model.kwargs.{key}", f"is not an argument of {where}; allowed: {allowed}"
            )


#: The checks of a config that trains a network (after its field rules).
NETWORK_CHECKS: tuple[config_lib.ConfigCheck, ...] = (
    config_lib.check_optimizer,
    config_lib.check_batch_sizes,
    check_model,
)


def abstract_num_sites(config: ml_collections.ConfigDict) -> int:
    """The number of quantization sites of ``config.model``, from shapes alone.

    The model is built abstractly (``nnx.eval_shape``) for the class count and image shape of
    ``config.data.name`` (``data.NUM_CLASSES``, ``data.IMAGE_SHAPES``), as the trainer will
    build it (a factory gets both as arguments).

    Raises:
      ConfigError: the model cannot be built for those inputs, or its program has no site (or
        another transform error).
    """
    name = config.data.name  # validated: a key of data.DATASETS
    if name not in data.IMAGE_SHAPES or name not in data.NUM_CLASSES:
        raise config_lib.ConfigError(
            "data.name", f"{name!r} lacks an entry in data.IMAGE_SHAPES or data.NUM_CLASSES"
        )
    h, w, c = data.IMAGE_SHAPES[name]
    spec = artifacts.ModelSpec(
        name=config.model.name,
        num_classes=data.NUM_CLASSES[name],
        in_channels=c,
        weight_bits=config.model.get("weight_bits", 8),
        kwargs=config_lib.to_dict(config.model.get("kwargs", {})),
        image_size=(h, w),
        factory=config.model.get("factory") or None,
    )
    try:
        return nnx.eval_shape(lambda: artifacts.build(spec)).num_sites
    except ValueError as err:  # e.g. transform.TransformError: the program has no site
        raise config_lib.ConfigError(
            "model", f"cannot derive the quantization sites: {err}"
        ) from None
    except Exception as err:  # noqa: BLE001 (a user's model failing on these inputs)
        raise config_lib.ConfigError(
            "model", f"cannot build it for {h}x{w}x{c} inputs: {type(err).__name__}: {err}"
        ) from None


def check_budgets(
    config: ml_collections.ConfigDict,
    choices: Sequence[int],
    budgets: Iterable[tuple[str, float]],
    *,
    num_sites: int | None = None,
) -> None:
    """Raises ConfigError naming the first ``(field, budget)`` infeasible for the model.

    Args:
      config: the config whose ``model`` and ``data`` give the sites.
      choices: the bit-width choices (validated).
      budgets: ``(field, mean budget)`` pairs, checked in order.
      num_sites: the model's sites if known (e.g. from a trained artifact); default
        :func:`abstract_num_sites`.
    """
    if num_sites is None:
        num_sites = abstract_num_sites(config)
    for field, budget in budgets:
        try:
            policy.Budget(tuple(choices), num_sites, float(budget))
        except policy.InfeasibleBudgetError as err:
            raise config_lib.ConfigError(field, str(err)) from None


def check_pair_budget(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """``quant.budget`` is feasible for ``config.model``'s sites and ``quant.choices``."""
    del num_devices  # a config_lib.ConfigCheck
    check_budgets(config, config.quant.choices, [("quant.budget", config.quant.budget)])
