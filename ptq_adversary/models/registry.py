"""The model registry: built-in networks by name, and users' model factories by path.

:data:`MODELS` holds the built-in constructors (:data:`ptq_adversary.models.zoo.ZOO`);
:func:`create_model` builds one wrapped in a :class:`~ptq_adversary.models.QuantizedModel`, and
:func:`load_factory` imports a user's constructor from ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from flax import nnx

from ptq_adversary.models.quantized import QuantizedModel
from ptq_adversary.models.zoo import ZOO

__all__ = ["MODELS", "create_model", "load_factory"]

#: The built-in architectures (see :mod:`ptq_adversary.models.zoo`).
MODELS: dict[str, Callable[..., nnx.Module]] = dict(ZOO)


def load_factory(path: str) -> Callable[..., nnx.Module]:
    """Imports a user's model constructor from ``"package.module:function"``.

    Raises:
      ValueError: a malformed path, a module that does not import, or a missing function.
    """
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model factory must look like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model factory {path!r}: cannot import {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model factory {path!r}: {module_name} has no function {attr!r}")
    return fn


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int] = 32,
    weight_bits: int | None = 8,
    rngs: nnx.Rngs,
    **kwargs,
) -> QuantizedModel:
    """Builds a registered model.

    Args:
      name: a key of :data:`MODELS`.
      num_classes: number of logits.
      in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
      image_size: ``H`` (square) or ``(H, W)`` of the inputs the sites are described for.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **kwargs: architecture arguments of the constructor (e.g. ``widths``, ``width``).

    Returns:
      The network wrapped in a :class:`QuantizedModel`, in inference mode (``model(x)`` uses
      the running statistics; :func:`~ptq_adversary.models.apply_model` switches modes itself).

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    net = MODELS[name](num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
    net.eval()  # a direct call is inference; apply_model sets the mode it is asked for
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return QuantizedModel(net, input_shape=(h, w, in_channels), weight_bits=weight_bits)
