"""The site table: one :class:`Site` per quantization site, with its name, shapes and FLOPs.

A site is named by the module path of its weight (``conv2``, ``layer1/0/conv1``; the parameter
leaf reached by following parameter-only unary ops back), else by the equation's name stack,
else generated (``dot_general_3``); repeated names get ``#2``, ``#3``...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ptq_adversary.transform import shim
from ptq_adversary.transform.program import Builder, Lit, Op, flops

__all__ = ["Site", "make_sites"]


@dataclasses.dataclass(frozen=True)
class Site:
    """A quantization site found in the program.

    Attributes:
      index: position in ``bits[:, l]`` (program order).
      name: the Flax module path of its weight (``conv2``, ``layer1/0/conv1``) where the
        program records one, else a generated name (``dot_general_3``).
      op: ``"conv"``, ``"dense"`` (a ``dot_general``) or ``"matmul"`` (activation product).
      data_shape: per-example shape of the quantized data operand (batch axis of size 1).
      weight_shape: shape of the parameter operand (``None`` for an activation product).
      out_shape: per-example output shape.
      flops: multiply-adds x 2 per example.
      flops_share: ``flops`` over the sum of all convs' and dots' flops (sites or not).
    """

    index: int
    name: str
    op: str
    data_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...]
    flops: int
    flops_share: float


def _site_name(
    producer: dict[int, Op], builder: Builder, op: Op, param_paths: dict[int, str], index: int
) -> str:
    """The module path of the site's weight, or the equation's name stack, or a generated name.

    ``producer``: value id -> the op that computes it.
    """
    if op.weight is not None:
        ref = op.ins[op.weight]
        # follow parameter-only unary ops (casts, reshapes, transposes) back to a leaf
        while not isinstance(ref, Lit) and ref in producer:
            nxt = [r for r in producer[ref].ins if not isinstance(r, Lit) and not builder.xdep[r]]
            if len(nxt) != 1:
                break
            ref = nxt[0]
        if not isinstance(ref, Lit) and ref in param_paths and param_paths[ref]:
            return param_paths[ref]
    stack = shim.name_stack(op.eqn)
    if stack:
        return stack
    kind = "conv" if shim.is_conv(op.eqn) else "dot_general"
    return f"{kind}_{index}"


_COLLECTIONS = {"params", "variables", "value"}


def _path_name(path) -> str:
    """``('params', 'Conv_0', 'kernel')`` -> ``Conv_0``; NNX ``conv2/kernel/value`` -> ``conv2``."""
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        keys.append(str(key))
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    keys = keys[:-1] if len(keys) > 1 else keys  # drop the leaf's own name (kernel, w)
    while len(keys) > 1 and keys[0] in _COLLECTIONS:
        keys = keys[1:]
    return "/".join(keys)


def make_sites(
    builder: Builder,
    ops: Sequence[Op],
    site_ops: Sequence[int],
    param_ids: Sequence[int],
    leaves_with_path: Sequence[tuple[Any, Any]],
) -> tuple[Site, ...]:
    """The :class:`Site` of every op in ``site_ops`` (op indices into ``ops``, site order).

    ``param_ids``: the value id of each parameter leaf; ``leaves_with_path``: the
    ``(key path, leaf)`` pairs of the params (``jax.tree_util.tree_flatten_with_path``), which
    name the sites.
    """
    paths = {
        pid: _path_name(path) for pid, (path, _) in zip(param_ids, leaves_with_path, strict=True)
    }
    linear = [(i, op) for i, op in enumerate(ops) if shim.is_conv(op.eqn) or shim.is_dot(op.eqn)]
    op_flops = {
        i: flops(
            op.eqn,
            [
                builder.avals[r] if not isinstance(r, Lit) else shim.aval(v)
                for r, v in zip(op.ins, op.eqn.invars, strict=True)
            ],
            builder.avals[op.outs[0]],
        )
        for i, op in linear
    }
    total = max(sum(op_flops.values()), 1)
    sites, seen = [], {}
    producer = {r: o for o in ops for r in o.outs}
    for i in site_ops:
        op = ops[i]
        name = _site_name(producer, builder, op, paths, op.site)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        d = op.ins[op.data[0]]
        w = op.ins[op.weight] if op.weight is not None else None
        kind = "matmul" if op.weight is None else ("conv" if shim.is_conv(op.eqn) else "dense")
        sites.append(
            Site(
                index=op.site,
                name=name,
                op=kind,
                data_shape=tuple(builder.avals[d].shape),
                weight_shape=None if w is None else tuple(builder.avals[w].shape),
                out_shape=tuple(builder.avals[op.outs[0]].shape),
                flops=int(op_flops[i]),
                flops_share=op_flops[i] / total,
            )
        )
    return tuple(sites)
