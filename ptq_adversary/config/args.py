"""Config-file arguments: :func:`parse_arg` and :func:`load_config_file`.

Config files (``configs/*.py``) are trusted Python, loaded by ``ml_collections.config_flags``;
each defines ``get_config(arg=None)`` and uses :func:`parse_arg` to read its comma-separated
``key=value`` argument (``--config=configs/x.py:smoke,budget=4``).
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Any

import ml_collections

from ptq_adversary.config.errors import ConfigError

__all__ = ["parse_arg", "load_config_file"]


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
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError("config", f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
