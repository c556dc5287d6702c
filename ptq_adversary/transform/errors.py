"""The errors the transformation raises (both are ``ValueError`` s)."""

from __future__ import annotations

__all__ = ["TransformError", "UnsupportedPrimitiveError"]


class TransformError(ValueError):
    """The program cannot be quantized as asked (no site, a site in a loop, mixed examples...)."""


class UnsupportedPrimitiveError(TransformError):
    """The program holds a primitive that interval bounds do not cover."""
