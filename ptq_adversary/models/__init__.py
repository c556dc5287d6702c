"""Model registry, the quantized-model wrapper and the functional boundary.

The zoo (:mod:`ptq_adversary.models.zoo`) and users' own networks are ordinary ``flax.nnx``
modules, ``net(x) -> logits [B, C]`` with BatchNorm switched by ``net.train()`` /
``net.eval()``; none of them knows about bit-widths. :class:`QuantizedModel` pairs such a
network with what the program transformation (:mod:`ptq_adversary.transform`) needs: the
per-example input shape and the weight bit-width. Its ``num_sites``, ``site_names`` and
``sites`` are derived from the network's traced program.

Training and evaluation code does not call modules directly: split a :class:`QuantizedModel`
once with :func:`split_model` and use the pure :func:`apply_model`

    apply_model(graphdef, params, rest, x, bits=None, *, train=False, frozen_bn=False)

with ``x`` float32 ``[B, H, W, C]`` and ``bits`` int ``[B, num_sites]`` (site order = program
order) or ``None`` for full precision. It jits, differentiates (straight-through) and vmaps over
a leading policy axis of ``bits`` with ``x`` and the weights shared. Any function
``fn(params, x)`` (a linen ``module.apply``, plain JAX) enters as a :class:`FunctionNet`.

Submodules, in dependency order (each imports only those above it):

* ``layers``: layer constructors (``conv``, ``dense``, ``batch_norm``) and blocks (``ConvBN``,
  ``BasicBlock``, ``PreActBlock``).
* ``networks``: the architectures ``ConvNet``, ``ResNet``, ``WideResNet``.
* ``zoo``: the named built-in constructors (``cnn``, ``teacher_cnn``, ``resnet18``,
  ``resnet20``, ``wrn16_4``) and their registry ``ZOO``; ``from ptq_adversary.models import
  zoo`` is the public place to reach them.
* ``quantized``: :class:`FunctionNet`, :class:`QuantizedModel`, :func:`as_quantized_model`,
  :func:`check_program` and the cached transformed program (:func:`quantized_fn`,
  :func:`quantized_program`, :func:`quantize_cache_info`, :func:`clear_quantize_cache`).
* ``registry``: :data:`MODELS`, :func:`create_model`, :func:`load_factory`.
* ``functional``: :func:`split_model`, :func:`apply_model`, :func:`batch_branches`,
  :func:`count_params`.
"""

from ptq_adversary.models import layers, networks, zoo
from ptq_adversary.models.functional import apply_model, batch_branches, count_params, split_model
from ptq_adversary.models.quantized import (
    FunctionNet,
    QuantizedModel,
    as_quantized_model,
    check_program,
    clear_quantize_cache,
    quantize_cache_info,
    quantized_fn,
    quantized_program,
)
from ptq_adversary.models.registry import MODELS, create_model, load_factory

__all__ = [
    "MODELS",
    "FunctionNet",
    "QuantizedModel",
    "apply_model",
    "as_quantized_model",
    "batch_branches",
    "check_program",
    "clear_quantize_cache",
    "count_params",
    "create_model",
    "layers",
    "load_factory",
    "networks",
    "quantize_cache_info",
    "quantized_fn",
    "quantized_program",
    "split_model",
    "zoo",
]
