"""Validation rules: :class:`Rule` and the public checks trainers build their rules from.

A :class:`Rule` names a dotted field and a value check ``value -> error message or None``;
:func:`check_rules` applies a list of them. The sections every network-training config shares
(``seed``, ``data``, ``eval``, ``log``, ``ckpt``; ``model``; ``optim``) have their rules here
(:func:`common_rules`, :func:`model_rules`, :func:`optim_rules`), as have the cross-field
checks ``(config, num_devices) -> None`` on them (:func:`check_optimizer`,
:func:`check_batch_sizes`). Each trainer registers its own list (:mod:`.registry`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import ml_collections

from ptq_adversary import data
from ptq_adversary.config.errors import ConfigError
from ptq_adversary.quant import MAX_BITS, MIN_BITS

__all__ = [
    "Check",
    "ConfigCheck",
    "OPTIMIZERS",
    "Rule",
    "at_least",
    "bit_choices",
    "bit_list",
    "bits",
    "boolean",
    "check_batch_sizes",
    "check_optimizer",
    "check_rules",
    "common_rules",
    "field_value",
    "fraction",
    "model_rules",
    "must_be_false",
    "non_empty_str",
    "non_negative",
    "one_of",
    "optim_rules",
    "positive",
    "positive_ints",
    "seed",
]

#: A value check: the error message for a bad value, ``None`` for a good one.
Check = Callable[[Any], str | None]
#: A cross-field check of a whole config on ``num_devices`` devices: raises :class:`ConfigError`.
ConfigCheck = Callable[[ml_collections.ConfigDict, int], None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``check`` applied to the value of the dotted ``field``.

    Attributes:
      field: e.g. ``"optim.learning_rate"``; a missing field is an error.
      check: returns an error message or ``None``.
      optional: ``None`` is allowed (and not checked).
    """

    field: str
    check: Check
    optional: bool = False


def field_value(config: Mapping[str, Any] | ml_collections.ConfigDict, field: str) -> Any:
    """The value of the dotted ``field``; :class:`ConfigError` ``"is missing"`` if absent."""
    node: Any = config
    for part in field.split("."):
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
            raise ConfigError(field, "is missing")
        node = node[part]
    return node


def check_rules(config: ml_collections.ConfigDict, rules: Iterable[Rule]) -> None:
    """Applies ``rules`` in order; raises :class:`ConfigError` on the first bad field."""
    for rule in rules:
        value = field_value(config, rule.field)
        if value is None and rule.optional:
            continue
        if (err := rule.check(value)) is not None:
            raise ConfigError(rule.field, err)


# ------------------------------------------------------------------------------ value checks
def positive(kind: type) -> Check:
    """A finite number ``> 0`` of ``kind`` (``float`` accepts ints too; bools never)."""

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


def non_negative(v: Any) -> str | None:
    """A finite number ``>= 0``."""
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < math.inf:
        return f"must be a finite number >= 0, got {v!r}"
    return None


def one_of(allowed: Collection[Any]) -> Check:
    """A member of ``allowed`` (listed sorted in the message)."""

    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {sorted(allowed)}, got {v!r}"

    return check


def at_least(low: int, reason: str) -> Check:
    """An int ``>= low``; ``reason`` says why, in the message."""

    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            return f"must be an int >= {low} ({reason}), got {v!r}"
        return None

    return check


def bits(v: Any) -> str | None:
    """A bit-width: an int in ``[quant.MIN_BITS, quant.MAX_BITS]``."""
    if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
        return f"must be an int in [{MIN_BITS}, {MAX_BITS}] or None, got {v!r}"
    return None


def bit_list(v: Any) -> str | None:
    """A list (or tuple) of bit-widths."""
    if not isinstance(v, list | tuple):
        return f"must be a list of ints, got {v!r}"
    for b in v:
        if (err := bits(b)) is not None:
            return f"entries {err.removesuffix(' or None, got ' + repr(b))}, got {b!r}"
    return None


def bit_choices(v: Any) -> str | None:
    """The bit-width choices of a budget: a non-empty, sorted list of unique bit-widths."""
    if (err := bit_list(v)) is not None:
        return err
    if not v or list(v) != sorted(set(v)):
        return (
            f"must be a non-empty list of unique bit-widths in [{MIN_BITS}, {MAX_BITS}] "
            "sorted ascending, "
            f"got {list(v)!r}"
        )
    return None


def fraction(v: Any) -> str | None:
    """A number in ``[0, 1)``."""
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
        return f"must be in [0, 1), got {v!r}"
    return None


def seed(v: Any) -> str | None:
    """A random seed: an int ``>= 0``."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return f"must be an int >= 0, got {v!r}"
    return None


def non_empty_str(v: Any) -> str | None:
    """A non-empty string."""
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def boolean(v: Any) -> str | None:
    """``True`` or ``False``."""
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def must_be_false(reason: str) -> Check:
    """Exactly ``False``; ``reason`` says why, in the message."""

    def check(v: Any) -> str | None:
        return None if v is False else f"must be False ({reason}), got {v!r}"

    return check


def positive_ints(v: Any) -> str | None:
    """A list (or tuple) of ints ``> 0`` (e.g. layer widths)."""
    if not isinstance(v, list | tuple) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in v
    ):
        return f"must be a list of positive ints, got {v!r}"
    return None


# ------------------------------------------------------------------------------ shared sections
def common_rules() -> list[Rule]:
    """``seed``, ``data``, ``eval``, ``log`` and ``ckpt``: what every trainer reads."""
    return [
        Rule("seed", seed),
        Rule("data.name", one_of(data.DATASETS)),
        Rule("data.val_size", positive(int)),
        Rule("data.train_limit", positive(int), optional=True),
        Rule("data.test_limit", positive(int), optional=True),
        Rule("eval.batch_size", positive(int)),
        Rule("eval.every_steps", positive(int)),
        Rule("log.every_steps", positive(int)),
        Rule("ckpt.every_steps", positive(int)),
        Rule("ckpt.max_to_keep", positive(int)),
    ]


def model_rules() -> list[Rule]:
    """``model``: a name (a registry name unless ``model.factory`` is set) and weight bits."""
    return [
        Rule("model.name", non_empty_str),
        Rule("model.weight_bits", bits, optional=True),
    ]


#: The optimizers ``optim.optimizer`` may name.
OPTIMIZERS = ("adamw", "sgd")


def optim_rules() -> list[Rule]:
    """``optim``, but ``optim.momentum`` (read by sgd only: :func:`check_optimizer`)."""
    return [
        Rule("optim.optimizer", one_of(OPTIMIZERS)),
        Rule("optim.learning_rate", positive(float)),
        Rule("optim.weight_decay", non_negative),
        Rule("optim.warmup_fraction", fraction),
        Rule("optim.batch_size", positive(int)),
        Rule("optim.num_epochs", positive(float)),
        Rule("optim.num_steps", positive(int), optional=True),
        Rule("optim.grad_clip_norm", positive(float), optional=True),
    ]


def check_optimizer(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """``optim.momentum`` is read by sgd only: required in ``[0, 1)`` with ``sgd``, and unset
    (absent or ``None``) with ``adamw``, whose value would be silently ignored."""
    del num_devices  # a ConfigCheck
    optim = config.optim
    if optim.optimizer == "sgd":
        if "momentum" not in optim:
            raise ConfigError("optim.momentum", "is missing (optimizer 'sgd' reads it)")
        if (err := fraction(optim.momentum)) is not None:
            raise ConfigError("optim.momentum", err)
    elif optim.get("momentum") is not None:
        raise ConfigError(
            "optim.momentum",
            f"is read by optimizer 'sgd' only; remove it with optimizer {optim.optimizer!r}, "
            f"got {optim.momentum!r}",
        )


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """``optim.batch_size`` at most ``data.train_limit``; both batch sizes divisible by the
    number of devices the batch is sharded over."""
    limit = field_value(config, "data.train_limit")
    if limit is not None and config.optim.batch_size > limit:
        raise ConfigError(
            "optim.batch_size",
            f"must be <= data.train_limit ({limit}), the training examples there are; "
            f"got {config.optim.batch_size}",
        )
    for field in ("optim.batch_size", "eval.batch_size"):
        if field_value(config, field) % num_devices:
            raise ConfigError(
                field,
                f"must be divisible by the number of devices ({num_devices}), "
                f"got {field_value(config, field)}",
            )
