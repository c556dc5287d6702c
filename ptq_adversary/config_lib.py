"""Config helpers: `arg` parsing for config files and start-up validation.

Config files (``configs/*.py``) are trusted Python, loaded by ``ml_collections.config_flags``;
each defines ``get_config(arg=None)`` and uses :func:`parse_arg` to read its comma-separated
``key=value`` argument (``--config=configs/x.py:smoke,budget=4``).

:func:`validate` checks a config once, before anything is written to the workdir, and raises
:class:`ConfigError` whose message names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ml_collections

__all__ = [
    "ConfigError",
    "parse_arg",
    "load_config_file",
    "validate",
    "to_dict",
    "compare_with_saved",
    "SHAPE_FIELDS",
]


class ConfigError(ValueError):
    """A config value is invalid. ``str(err)`` is a one-line message naming the field."""

    def __init__(self, field: str, message: str | None = None):
        # One-argument form: a full message (how absl and copy re-create exceptions).
        self.field = field if message is not None else None
        self.message = message
        super().__init__(f"config.{field}: {message}" if message is not None else field)


# ---------------------------------------------------------------------------------- parse_arg
def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config-file argument such as ``"smoke,budget=4,mode=robust"``.

    Each key must appear in ``defaults``; its value is converted to the default's type
    (``bool`` accepts ``true/false/1/0``; a bare key sets a bool to True). Unknown keys raise
    :class:`ConfigError` listing the known ones.

    Args:
      arg: the text after ``:`` in ``--config=file.py:arg`` (``None`` or ``""`` for none).
      **defaults: the accepted keys and their default values.

    Returns:
      A ConfigDict with every key of ``defaults``.
    """
    values = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"arg.{key}", f"unknown config arg; known args: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"arg.{key}", "needs a value, e.g. key=value")
            values[key] = True
            continue
        values[key] = _convert(key, text.strip(), default)
    return ml_collections.ConfigDict(values)


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"arg.{key}", f"expected true/false, got {text!r}")
    if isinstance(default, int | float):
        try:
            return type(default)(text)
        except ValueError:
            raise ConfigError(
                f"arg.{key}", f"expected {type(default).__name__}, got {text!r}"
            ) from None
    if isinstance(default, str) or default is None:
        return text
    try:  # tuples, lists
        return type(default)(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"arg.{key}", f"cannot parse {text!r}") from None


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (as config_flags would load it).

    Lets one config build on another (e.g. a pipeline reusing a teacher config) with a single
    source of truth. Config files are trusted Python: loading one runs it.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError("config", f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ---------------------------------------------------------------------------------- validation
@dataclasses.dataclass(frozen=True)
class _Rule:
    field: str
    check: Callable[[Any], str | None]  # returns an error message or None
    optional: bool = False  # None is allowed


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = config
    for part in field.split("."):
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
            raise ConfigError(field, "is missing")
        node = node[part]
    return node


def _positive(kind: type) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok_type = isinstance(v, kind) and not isinstance(v, bool)
        if kind is float:
            ok_type = isinstance(v, int | float) and not isinstance(v, bool)
        if not ok_type:
            return f"must be a {kind.__name__} > 0, got {v!r}"
        if not math.isfinite(v):
            return f"must be a finite number > 0, got {v!r}"
        return None if v > 0 else f"must be > 0, got {v!r}"

    return check


def _non_negative(v: Any) -> str | None:
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < math.inf:
        return f"must be a finite number >= 0, got {v!r}"
    return None


def _one_of(allowed: Collection[Any]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {sorted(allowed)}, got {v!r}"

    return check


def _bits(v: Any) -> str | None:
    from ptq_adversary.quant import MAX_BITS, MIN_BITS

    if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
        return f"must be an int in [{MIN_BITS}, {MAX_BITS}] or None, got {v!r}"
    return None


def _bit_list(v: Any) -> str | None:
    if not isinstance(v, list | tuple):
        return f"must be a list of ints, got {v!r}"
    for b in v:
        if (err := _bits(b)) is not None:
            return f"entries {err.removesuffix(' or None, got ' + repr(b))}, got {b!r}"
    return None


def _fraction(v: Any) -> str | None:
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
        return f"must be in [0, 1), got {v!r}"
    return None


def _seed(v: Any) -> str | None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return f"must be an int >= 0, got {v!r}"
    return None


def _common_rules() -> list[_Rule]:
    from ptq_adversary import data

    return [
        _Rule("seed", _seed),
        _Rule("data.name", _one_of(data.DATASETS)),
        _Rule("data.val_size", _positive(int)),
        _Rule("data.train_limit", _positive(int), optional=True),
        _Rule("data.test_limit", _positive(int), optional=True),
        _Rule("eval.batch_size", _positive(int)),
        _Rule("eval.every_steps", _positive(int)),
        _Rule("log.every_steps", _positive(int)),
        _Rule("ckpt.every_steps", _positive(int)),
        _Rule("ckpt.max_to_keep", _positive(int)),
    ]


def _optim_rules() -> list[_Rule]:
    return [
        _Rule("optim.optimizer", _one_of(("adamw", "sgd"))),
        _Rule("optim.learning_rate", _positive(float)),
        _Rule("optim.weight_decay", _non_negative),
        _Rule("optim.momentum", _fraction),
        _Rule("optim.warmup_fraction", _fraction),
        _Rule("optim.batch_size", _positive(int)),
        _Rule("optim.num_epochs", _positive(float)),
        _Rule("optim.num_steps", _positive(int), optional=True),
        _Rule("optim.grad_clip_norm", _positive(float), optional=True),
    ]


def _model_rules() -> list[_Rule]:
    return [
        _Rule("model.name", _is_str),  # a registry name unless model.factory is set
        _Rule("model.weight_bits", _bits, optional=True),
    ]


def _supervised_rules() -> list[_Rule]:
    return [
        *_common_rules(),
        *_model_rules(),
        *_optim_rules(),
        _Rule("optim.label_smoothing", _fraction),
        _Rule("eval.uniform_bits", _bit_list),
    ]


def _is_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def _is_false(v: Any) -> str | None:
    return (
        None
        if v is False
        else (f"must be False (teacher logits are cached on un-augmented images), got {v!r}")
    )


def _distill_rules() -> list[_Rule]:
    return [
        *_supervised_rules(),
        _Rule("kd.temperature", _positive(float)),
        _Rule("kd.label_weight", _non_negative),
        _Rule("teacher.model_dir", _is_str),
        _Rule("data.augment", _is_false),
    ]


def _choices(v: Any) -> str | None:
    if (err := _bit_list(v)) is not None:
        return err
    from ptq_adversary.quant import MAX_BITS, MIN_BITS

    if not v or list(v) != sorted(set(v)):
        return (
            f"must be a non-empty list of unique bit-widths in [{MIN_BITS}, {MAX_BITS}] "
            "sorted ascending, "
            f"got {list(v)!r}"
        )
    return None


def _widths(v: Any) -> str | None:
    if not isinstance(v, list | tuple) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in v
    ):
        return f"must be a list of positive ints, got {v!r}"
    return None


def _policy_aware_rules() -> list[_Rule]:
    from ptq_adversary import steps

    def at_least_2(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            return f"must be an int >= 2 (leave-one-out baseline), got {v!r}"
        return None

    return [
        *_common_rules(),
        *_model_rules(),
        *_optim_rules(),
        _Rule("mode", _one_of(steps.MODES)),
        _Rule("student_dir", _is_str),
        _Rule("data.augment", _is_false),
        _Rule("quant.choices", _choices),
        _Rule("quant.budget", _positive(float)),
        _Rule("policy.widths", _widths),
        _Rule("policy.learning_rate", _positive(float)),
        _Rule("pair.num_samples", at_least_2),
        _Rule("pair.quant_batch", _positive(int), optional=True),
        _Rule("pair.temperature", _positive(float)),
        _Rule("pair.quant_weight", _non_negative),
        _Rule("pair.margin", _non_negative),
        _Rule("pair.reward", _one_of(steps.REWARDS)),
        _Rule("pair.entropy_coef", _non_negative),
        _Rule("pair.fp_tolerance", _fraction),
        _Rule("pair.num_random_eval", _positive(int)),
    ]


def _pipeline_rules() -> list[_Rule]:
    from ptq_adversary import steps
    from ptq_adversary.trainers.pipeline import STAGES

    def modes(v: Any) -> str | None:
        if not isinstance(v, list | tuple) or not v or any(m not in steps.MODES for m in v):
            return f"must be a non-empty list of {list(steps.MODES)}, got {v!r}"
        return None

    return [_Rule("stage", _one_of(("all", *STAGES))), _Rule("modes", modes)]


def _audit_rules() -> list[_Rule]:
    from ptq_adversary.trainers import audit

    return audit.rules()


_RULES: dict[str, Callable[[], list[_Rule]]] = {
    "audit": _audit_rules,
    "supervised": _supervised_rules,
    "distill": _distill_rules,
    "policy_aware": _policy_aware_rules,
    "pipeline": _pipeline_rules,
}


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1) -> None:
    """Checks every field the trainer reads; raises :class:`ConfigError` on the first bad one.

    Args:
      config: the full experiment config.
      num_devices: devices the batch is sharded over; batch sizes must divide by it.
    """
    trainer = _get(config, "trainer")
    if trainer not in _RULES:
        raise ConfigError("trainer", f"must be one of {sorted(_RULES)}, got {trainer!r}")
    for rule in _RULES[trainer]():
        value = _get(config, rule.field)
        if value is None and rule.optional:
            continue
        if (err := rule.check(value)) is not None:
            raise ConfigError(rule.field, err)
    if trainer == "pipeline":
        from ptq_adversary.trainers.pipeline import pipeline_field, stage_configs

        for stage, stage_config in stage_configs(config, "workdir").items():
            try:
                validate(stage_config, num_devices=num_devices)
            except ConfigError as err:
                # Name the field as the user spells it in the pipeline config.
                if err.field is None:
                    raise
                raise ConfigError(
                    pipeline_field(stage, err.field), f"{err.message} (stage {stage})"
                ) from None
        return
    limit = _get(config, "data.train_limit")
    if limit is not None and config.optim.batch_size > limit:
        raise ConfigError(
            "optim.batch_size",
            f"must be <= data.train_limit ({limit}), the training examples there are; "
            f"got {config.optim.batch_size}",
        )
    for field in ("optim.batch_size", "eval.batch_size"):
        if _get(config, field) % num_devices:
            raise ConfigError(
                field,
                f"must be divisible by the number of devices ({num_devices}), "
                f"got {_get(config, field)}",
            )
    _validate_model_kwargs(config)
    if trainer == "policy_aware":
        _validate_budget(config)


def abstract_num_sites(config: ml_collections.ConfigDict) -> int:
    """The number of quantization sites of ``config.model``, from shapes alone.

    The model is built abstractly (``nnx.eval_shape``) for 10 classes and the image shape of
    ``config.data.name`` (``data.IMAGE_SHAPES``); the registry's sites depend on neither the
    classes nor the channels, and a factory gets both as arguments.

    Raises:
      ConfigError: the model cannot be built for those inputs, or its program has no site (or
        another transform error).
    """
    from flax import nnx

    from ptq_adversary import artifacts, data

    h, w, c = data.IMAGE_SHAPES.get(config.data.get("name", ""), (32, 32, 1))
    spec = artifacts.ModelSpec(
        name=config.model.name,
        num_classes=10,
        in_channels=c,
        weight_bits=config.model.get("weight_bits", 8),
        kwargs=to_dict(config.model.get("kwargs", {})),
        image_size=(h, w),
        factory=config.model.get("factory") or None,
    )
    try:
        return nnx.eval_shape(lambda: artifacts.build(spec)).num_sites
    except ValueError as err:  # e.g. transform.TransformError: the program has no site
        raise ConfigError("model", f"cannot derive the quantization sites: {err}") from None
    except Exception as err:  # noqa: BLE001 (a user's model failing on these inputs)
        raise ConfigError(
            "model", f"cannot build it for {h}x{w}x{c} inputs: {type(err).__name__}: {err}"
        ) from None


def _validate_budget(config: ml_collections.ConfigDict) -> None:
    """The budget must be feasible for the model's number of sites (known without weights)."""
    from ptq_adversary import policy

    num_sites = abstract_num_sites(config)
    try:
        policy.Budget(tuple(config.quant.choices), num_sites, float(config.quant.budget))
    except policy.InfeasibleBudgetError as err:
        raise ConfigError("quant.budget", str(err)) from None


def _validate_model_kwargs(config: ml_collections.ConfigDict) -> None:
    """``model.name`` in the registry (or ``model.factory`` importable), kwargs it accepts."""
    import inspect

    from ptq_adversary import models

    factory = config.model.get("factory") or None
    if factory:
        try:
            ctor = models.load_factory(factory)
        except ValueError as err:
            raise ConfigError("model.factory", str(err)) from None
        where = f"factory {factory!r}"
    else:
        if config.model.name not in models.MODELS:
            raise ConfigError(
                "model.name",
                f"must be one of {sorted(models.MODELS)}, got {config.model.name!r} (for your "
                "own model set model.factory='package.module:function')",
            )
        ctor = models.MODELS[config.model.name]
        where = f"model {config.model.name!r}"
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in to_dict(config.model.get("kwargs", {})):
        if key not in params:
            allowed = [k for k in params if k not in ("num_classes", "in_channels", "rngs")]
            raise ConfigError(
                f"model.kwargs.{key}", f"is not an argument of {where}; allowed: {allowed}"
            )


# ---------------------------------------------------------------------------------- saved configs
def to_dict(config: Any) -> Any:
    """A JSON-ready plain-dict copy of a ConfigDict (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=list))


#: Fields that fix the shapes of what a workdir's checkpoints hold. A workdir started with one
#: value cannot be resumed with another.
SHAPE_FIELDS = (
    "trainer",
    "data.name",
    "model.name",
    "model.factory",
    "model.kwargs",
    "optim.optimizer",
    "mode",
    "quant",
    "policy.widths",
    "teacher.model",
    "student.model",
    "pairs.quant",
    "pairs.policy.widths",
)


def compare_with_saved(config: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> None:
    """Raises :class:`ConfigError` if ``config`` differs from a workdir's saved config in a field
    that fixes checkpoint shapes (:data:`SHAPE_FIELDS`)."""
    current = to_dict(config)
    for field in SHAPE_FIELDS:
        a, b = _lookup(current, field), _lookup(saved, field)
        if a != b:
            raise ConfigError(
                field,
                f"is {a!r} but the workdir holds a run with {b!r}; "
                "use a new --workdir or the original config",
            )


def _lookup(tree: Mapping[str, Any], field: str) -> Any:
    node: Any = tree
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
