"""The JAX program shim: the only module that touches jaxpr types and primitive binding.

Names that moved between releases are looked up defensively here and nowhere else. Tested on
jax 0.10.2; written for the names of jax 0.6-0.11 (``jit_p`` / ``pjit``, ``get_bind_params``
returning the params alone or with subfuns, ``ClosedJaxpr`` with or without a separate
``Jaxpr``).

Vocabulary: a *closed program* is what :func:`trace` returns (a ``ClosedJaxpr``, or a ``Jaxpr``
holding its constants in later releases); an *equation* (``eqn``) is one primitive application
in it, with ``invars`` / ``outvars`` (variables or literals) and ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex

__all__ = [
    "LOOP_NAMES",
    "aval",
    "bind",
    "inline_body",
    "is_conv",
    "is_dot",
    "is_literal",
    "name_stack",
    "open_program",
    "subprograms",
    "trace",
]


def _primitive(name: str):
    return getattr(jex.core.primitives, name, None)


_CONV = _primitive("conv_general_dilated_p")
_DOT = _primitive("dot_general_p")
# Call-like primitives whose body is one jaxpr taking the equation's operands in order.
_INLINE_NAMES = {"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}
_CUSTOM_NAMES = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
#: Loop and branch primitives (their names in jaxprs) -> the construct a user writes.
LOOP_NAMES = {"scan": "lax.scan", "while": "lax.while_loop", "cond": "lax.cond/switch"}


def trace(fn: Callable, *args) -> Any:
    """``jax.make_jaxpr(fn)(*args)``: a closed program (arrays or ShapeDtypeStructs in)."""
    return jax.make_jaxpr(fn)(*args)


def open_program(closed: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a ClosedJaxpr (jax <= 0.10) or of a merged Jaxpr (later).

    ``jaxpr`` has ``constvars`` (one per entry of ``consts``), ``invars``, ``eqns`` and
    ``outvars``.
    """
    if hasattr(closed, "jaxpr") and hasattr(closed, "consts"):
        return closed.jaxpr, closed.consts
    return closed, tuple(getattr(closed, "consts", ()))


def is_literal(v: Any) -> bool:
    """Whether an equation operand is a literal (its value is ``v.val``), not a variable."""
    return isinstance(v, jex.core.Literal)


def aval(v: Any) -> Any:
    """The abstract value (``.shape``, ``.dtype``) of a jaxpr variable or literal."""
    return v.aval


def bind(eqn: Any, invals: Sequence[Any], **overrides) -> list[Any]:
    """Re-binds one equation's primitive on new operands (optionally with changed params).

    Returns the list of outputs (one entry for a single-result primitive).
    """
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(params, tuple) and len(params) == 2 and isinstance(params[1], dict):
        subfuns, params = params  # jax < 0.10: (subfuns, params)
    params = {**params, **overrides}
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is not None:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def subprograms(eqn: Any) -> list[Any]:
    """Every jaxpr nested in an equation's params (bodies of loops, branches, calls)."""
    found = []

    def visit(p):
        if hasattr(p, "eqns") or (hasattr(p, "jaxpr") and hasattr(p, "consts")):
            found.append(p)
        elif isinstance(p, (tuple, list)):
            for q in p:
                visit(q)

    for p in eqn.params.values():
        visit(p)
    return found


def inline_body(eqn: Any) -> Any | None:
    """The body to inline for a call-like equation (its operands map to the body's inputs).

    ``None`` for any other equation. Call-like: ``jit``/``pjit``, ``remat``/``checkpoint``,
    ``custom_jvp_call`` and ``custom_vjp_call`` (whose derivative rule is then dropped).
    """
    name = eqn.primitive.name
    if name in _INLINE_NAMES:
        return eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if name in _CUSTOM_NAMES:
        return eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    return None


def name_stack(eqn: Any) -> str:
    """The equation's name stack (e.g. the Flax module path ``layer1/0/conv1``), or ``""``."""
    info = getattr(eqn, "source_info", None)
    return str(getattr(info, "name_stack", "") or "")


def is_conv(eqn: Any) -> bool:
    """Whether the equation is a ``conv_general_dilated``."""
    return eqn.primitive is _CONV or eqn.primitive.name == "conv_general_dilated"


def is_dot(eqn: Any) -> bool:
    """Whether the equation is a ``dot_general``."""
    return eqn.primitive is _DOT or eqn.primitive.name == "dot_general"
