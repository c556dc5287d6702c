"""The one error type of config handling: :class:`ConfigError`."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value is invalid. ``str(err)`` is a one-line message naming the field.

    Args:
      field: the dotted field (``"optim.learning_rate"``), or, alone, a full message.
      message: what is wrong with it and what is allowed.
    """

    def __init__(self, field: str, message: str | None = None):
        # One-argument form: a full message (how absl and copy re-create exceptions).
        self.field = field if message is not None else None
        self.message = message
        super().__init__(f"config.{field}: {message}" if message is not None else field)
