"""Configs: config-file arguments, validation rules, the trainers' rule registry, saved configs.

Import it as ``from ptq_adversary import config as config_lib`` where a local ``config`` (an
``ml_collections.ConfigDict``) is about. Submodules:

* :mod:`.errors`: :class:`ConfigError`, whose one-line message names the field.
* :mod:`.args`: :func:`parse_arg` (a config file's ``:key=value,...`` argument) and
  :func:`load_config_file` (one config file building on another).
* :mod:`.rules`: :class:`Rule`, :func:`check_rules` and the public value checks
  (:func:`positive`, :func:`one_of`, :func:`bits`, :func:`bit_choices`, :func:`fraction`, ...)
  trainers build their rules from; the shared sections' rules (:func:`common_rules`,
  :func:`model_rules`, :func:`optim_rules`) and cross-field checks (:func:`check_optimizer`,
  :func:`check_batch_sizes`).
* :mod:`.registry`: :func:`register` (each trainer module registers its rules at import, so
  this package knows no trainer) and :func:`validate`, which checks a config once, before
  anything is written to the workdir, by the rules of ``config.trainer``.
* :mod:`.compare`: :func:`to_dict` (``config.json``) and :func:`compare_with_saved` (a
  workdir resumes only with the :data:`SHAPE_FIELDS` it was started with).
"""

from ptq_adversary.config.args import load_config_file, parse_arg
from ptq_adversary.config.compare import SHAPE_FIELDS, compare_with_saved, to_dict
from ptq_adversary.config.errors import ConfigError
from ptq_adversary.config.registry import (
    Registration,
    register,
    registered,
    registration,
    validate,
)
from ptq_adversary.config.rules import (
    OPTIMIZERS,
    Check,
    ConfigCheck,
    Rule,
    at_least,
    bit_choices,
    bit_list,
    bits,
    boolean,
    check_batch_sizes,
    check_optimizer,
    check_rules,
    common_rules,
    field_value,
    fraction,
    model_rules,
    must_be_false,
    non_empty_str,
    non_negative,
    one_of,
    optim_rules,
    positive,
    positive_ints,
    seed,
)

__all__ = [
    "OPTIMIZERS",
    "SHAPE_FIELDS",
    "Check",
    "ConfigCheck",
    "ConfigError",
    "Registration",
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
    "compare_with_saved",
    "field_value",
    "fraction",
    "load_config_file",
    "model_rules",
    "must_be_false",
    "non_empty_str",
    "non_negative",
    "one_of",
    "optim_rules",
    "parse_arg",
    "positive",
    "positive_ints",
    "register",
    "registered",
    "registration",
    "seed",
    "to_dict",
    "validate",
]
