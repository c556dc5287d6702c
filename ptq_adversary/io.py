"""Files a run writes and reads back: atomic writes, and JSON reading with clear failures.

Every result file (``results.json``, ``timing.json``, reports, artifacts' ``spec.json``) goes
through :func:`write_text_atomic`, so a reader sees the old file or the new one, never a mix,
even when the process is killed mid-write (preemption).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

__all__ = ["read_json", "write_json_atomic", "write_text_atomic"]

_MISSING = object()


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half-written).

    A reader sees the old file or the new one, never a mix, even if the process is killed. A
    write that fails (a full disk) leaves the old file and removes its temporary file.
    """
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str, default: Any = _MISSING) -> Any:
    """The JSON value stored in ``path``.

    Args:
      path: the file.
      default: returned when the file does not exist; without it a missing file raises.

    Raises:
      FileNotFoundError: ``path`` does not exist and no ``default`` was given.
      ValueError: the file is not valid JSON (the message names the file), e.g. a file another
        program cut short; files written by :func:`write_json_atomic` never are.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
