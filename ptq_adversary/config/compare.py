"""Saved configs: :func:`to_dict` for ``config.json`` and :func:`compare_with_saved` on resume.

Only :data:`SHAPE_FIELDS` bind a workdir to its config: any other field may change between
invocations, and a field an older version of a config file had (one removed since) is simply
absent from the new config, so old workdirs stay resumable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from ptq_adversary.config.errors import ConfigError

__all__ = ["SHAPE_FIELDS", "compare_with_saved", "to_dict"]


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
