"""Trainer name -> its validation rules: :func:`register`, :func:`validate`.

Each trainer module registers its rules when it is imported (``ptq_adversary.training``
imports them all), so this module knows no trainer::

    config_lib.register("supervised", rules, checks=(config_lib.check_batch_sizes, ...))

:func:`validate` finds the rules of ``config.trainer`` here and applies them, then the
trainer's cross-field checks; code that validates configs imports ``ptq_adversary.training``
first (the command line, the trainers and the tests do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import ml_collections

from ptq_adversary.config.errors import ConfigError
from ptq_adversary.config.rules import ConfigCheck, Rule, check_rules, field_value

__all__ = ["Registration", "register", "registered", "registration", "validate"]


@dataclasses.dataclass(frozen=True)
class Registration:
    """What :func:`validate` checks for one trainer.

    Attributes:
      trainer: the name configs give it (``config.trainer``).
      rules: field rules, applied in order.
      checks: cross-field checks ``(config, num_devices) -> None``, run after the rules.
    """

    trainer: str
    rules: tuple[Rule, ...]
    checks: tuple[ConfigCheck, ...] = ()


_REGISTRY: dict[str, Registration] = {}


def register(trainer: str, rules: Iterable[Rule], *, checks: Iterable[ConfigCheck] = ()) -> None:
    """Registers the rules of ``trainer`` (a trainer module calls this once, at import).

    Raises:
      ValueError: ``trainer`` is registered already.
    """
    if trainer in _REGISTRY:
        raise ValueError(f"trainer {trainer!r} is registered already")
    _REGISTRY[trainer] = Registration(trainer, tuple(rules), tuple(checks))


def registered() -> tuple[str, ...]:
    """The names of the registered trainers, sorted."""
    return tuple(sorted(_REGISTRY))


def registration(trainer: object) -> Registration:
    """The registration of ``trainer``; :class:`ConfigError` on ``config.trainer`` listing the
    registered ones if there is none."""
    if not isinstance(trainer, str) or trainer not in _REGISTRY:
        hint = "" if _REGISTRY else " (none is registered: import ptq_adversary.training first)"
        raise ConfigError("trainer", f"must be one of {list(registered())}{hint}, got {trainer!r}")
    return _REGISTRY[trainer]


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1) -> None:
    """Checks every field the trainer reads; raises :class:`ConfigError` on the first bad one.

    Args:
      config: the full experiment config; ``config.trainer`` names a registered trainer.
      num_devices: devices the batch is sharded over; batch sizes must divide by it.
    """
    entry = registration(field_value(config, "trainer"))
    check_rules(config, entry.rules)
    for check in entry.checks:
        check(config, num_devices)
