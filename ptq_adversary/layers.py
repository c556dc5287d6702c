"""Quantizable building blocks with bit-widths threaded explicitly as data.

Every block here is an ``nnx.Module`` that exposes the same small interface, so blocks compose
into models (and users can build their own) without any global quantization context:

* ``num_sites: int`` and ``site_names: tuple[str, ...]`` (static): the quantization sites the
  block owns, in forward order. A site is the input activation of a conv or dense layer, except
  the network's first layer (its input is the image), which is built with
  ``quantize_input=False`` and owns no site.
* ``__call__(x, bits=None, *, train=False, frozen_bn=False)``: ``bits`` is an integer array
  ``[B, num_sites]`` (may be traced; under ``jax.vmap`` over a policy axis each call still sees
  ``[B, num_sites]``) or ``None``. ``None`` selects the full-precision path statically: no
  activation and no weight quantization. With ``bits``, site ``i``'s input is fake-quantized at
  ``bits[:, i]`` per example, and every conv/dense weight (site or not) is fake-quantized at the
  layer's static ``weight_bits`` (``None`` keeps weights in full precision). Weight bits never
  depend on ``bits``, so weights stay shared across policies and ``vmap`` over policies does not
  turn convolutions into grouped ones.

Composite blocks hand each child its columns of ``bits`` with :func:`split_bits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary.quant import fake_quant_activation, fake_quant_weight

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "ConvBN",
    "PreActBlock",
    "QConv",
    "QDense",
    "Quantizable",
    "split_bits",
]

Padding = str | Sequence[tuple[int, int]]

# He init suits convs followed by BatchNorm + ReLU (what torchvision's ResNets use as well).
_CONV_INIT = nnx.initializers.he_normal()
_DENSE_INIT = nnx.initializers.lecun_normal()

# PyTorch's BatchNorm momentum 0.1 (flax counts the other way): short CIFAR/Fashion-MNIST runs
# need running statistics that catch up within a few hundred steps.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class Quantizable(Protocol):
    """What :func:`split_bits` needs from a block: how many sites it owns."""

    num_sites: int
    site_names: tuple[str, ...]


def split_bits(bits: ArrayLike | None, blocks: Sequence[Quantizable]) -> list[jax.Array | None]:
    """Splits a bit allocation into consecutive per-block column slices.

    Args:
      bits: integer array ``[B, L]`` with ``L == sum(b.num_sites for b in blocks)``, or ``None``
        (full precision).
      blocks: the children in forward order; each has a static ``num_sites``.

    Returns:
      One entry per block: ``bits[:, start:start + num_sites]`` (``[B, num_sites]``, possibly
      ``[B, 0]`` for a block without sites, which still signals "quantize weights"), or ``None``
      for every block when ``bits`` is ``None``.

    Raises:
      ValueError: if ``bits`` is not 2-D or its last axis does not match the blocks' sites.
    """
    if bits is None:
        return [None] * len(blocks)
    bits = jnp.asarray(bits)
    total = sum(b.num_sites for b in blocks)
    if bits.ndim != 2 or bits.shape[1] != total:
        names = [name for b in blocks for name in b.site_names]
        raise ValueError(f"bits must have shape [B, {total}] for sites {names}, got {bits.shape}")
    out = []
    start = 0
    for block in blocks:
        out.append(bits[:, start : start + block.num_sites])
        start += block.num_sites
    return out


def _check_layer_bits(bits: jax.Array, num_sites: int, name: str) -> None:
    if bits.ndim != 2 or bits.shape[1] != num_sites:
        raise ValueError(f"{name}: bits must have shape [B, {num_sites}], got {bits.shape}")


def _maybe_quant_weight(w: jax.Array, weight_bits: int | None) -> jax.Array:
    return w if weight_bits is None else fake_quant_weight(w, weight_bits, channel_axis=-1)


class QConv(nnx.Module):
    """2-D convolution (NHWC, HWIO kernel) with a fake-quantized input site and weights.

    Attributes:
      num_sites: 1 if ``quantize_input`` else 0.
      site_names: ``(name,)`` or ``()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int],
        *,
        strides: int | tuple[int, int] = 1,
        padding: Padding | None = None,
        use_bias: bool = False,
        quantize_input: bool = True,
        weight_bits: int | None = 8,
        name: str = "conv",
        kernel_init: nnx.Initializer = _CONV_INIT,
        rngs: nnx.Rngs,
    ):
        """Builds the layer.

        Args:
          in_features: input channels ``C_in``.
          out_features: output channels ``C_out``.
          kernel_size: ``k`` or ``(kh, kw)``.
          strides: ``s`` or ``(sh, sw)``.
          padding: ``None`` (default) pads ``k // 2`` on every side, PyTorch's ``padding=k//2``:
            the same as ``"SAME"`` at stride 1, but symmetric at stride 2 where XLA's ``"SAME"``
            pads ``(0, 1)``, so layouts match PyTorch models. Or ``"SAME"``, ``"VALID"``, or
            explicit ``((top, bottom), (left, right))``.
          use_bias: add a bias (off by default: convs here are followed by BatchNorm).
          quantize_input: whether the input activation is a quantization site (``False`` for
            the network's first layer).
          weight_bits: static weight bit-width used whenever ``bits`` is given; ``None`` keeps
            the weights in full precision.
          name: human-readable site name, e.g. ``"stage2.block1.conv1"``.
          kernel_init: initializer for the ``[kh, kw, C_in, C_out]`` kernel.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        if padding is None:
            padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.quantize_input = quantize_input
        self.weight_bits = weight_bits
        self.name = name
        self.num_sites = 1 if quantize_input else 0
        self.site_names = (name,) if quantize_input else ()

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Applies the (fake-quantized) convolution.

        Args:
          x: float ``[B, H, W, C_in]``.
          bits: int ``[B, num_sites]`` or ``None`` for full precision.
          train: unused (no BatchNorm here); accepted so all blocks share one signature.
          frozen_bn: unused, likewise.

        Returns:
          float ``[B, H', W', C_out]``.
        """
        del train, frozen_bn
        x = jnp.asarray(x)
        kernel = self.kernel[...]
        if bits is not None:
            bits = jnp.asarray(bits)
            _check_layer_bits(bits, self.num_sites, self.name)
            if self.quantize_input:
                x = fake_quant_activation(x, bits[:, 0])
            kernel = _maybe_quant_weight(kernel, self.weight_bits)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class QDense(nnx.Module):
    """Dense layer ``x @ W + b`` with a fake-quantized input site and weights.

    Attributes:
      num_sites: 1 if ``quantize_input`` else 0.
      site_names: ``(name,)`` or ``()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        quantize_input: bool = True,
        weight_bits: int | None = 8,
        name: str = "dense",
        kernel_init: nnx.Initializer = _DENSE_INIT,
        rngs: nnx.Rngs,
    ):
        """Builds the layer.

        Args:
          in_features: input features ``F_in``.
          out_features: output features ``F_out``.
          use_bias: add a (never quantized) bias.
          quantize_input: whether the input activation is a quantization site.
          weight_bits: static weight bit-width used whenever ``bits`` is given; ``None`` keeps
            the weights in full precision.
          name: human-readable site name, e.g. ``"head"``.
          kernel_init: initializer for the ``[F_in, F_out]`` kernel.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.quantize_input = quantize_input
        self.weight_bits = weight_bits
        self.name = name
        self.num_sites = 1 if quantize_input else 0
        self.site_names = (name,) if quantize_input else ()

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Applies the (fake-quantized) dense layer.

        Args:
          x: float ``[B, F_in]``; the quantization range is taken per example over ``F_in``.
          bits: int ``[B, num_sites]`` or ``None`` for full precision.
          train: unused (no BatchNorm here); accepted so all blocks share one signature.
          frozen_bn: unused, likewise.

        Returns:
          float ``[B, F_out]``.
        """
        del train, frozen_bn
        x = jnp.asarray(x)
        kernel = self.kernel[...]
        if bits is not None:
            bits = jnp.asarray(bits)
            _check_layer_bits(bits, self.num_sites, self.name)
            if self.quantize_input:
                x = fake_quant_activation(x, bits[:, 0])
            kernel = _maybe_quant_weight(kernel, self.weight_bits)
        y = x @ kernel
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis with the project's train / frozen-statistics switch.

    ``train=True, frozen_bn=False`` normalizes with batch statistics and updates the running
    averages; every other combination uses the running averages and leaves them unchanged, so
    the output for one example never depends on the rest of the batch (stage B's frozen mode
    and evaluation). Owns no quantization site.
    """

    num_sites = 0
    site_names: tuple[str, ...] = ()

    def __init__(self, num_features: int, *, rngs: nnx.Rngs):
        """Builds the layer.

        Args:
          num_features: channels ``C`` (last axis).
          rngs: ``nnx.Rngs`` (BatchNorm needs none, kept for a uniform constructor).
        """
        self.norm = nnx.BatchNorm(
            num_features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, rngs=rngs
        )

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Normalizes ``x``.

        Args:
          x: float ``[..., C]``.
          bits: ignored (no site); accepted so all blocks share one signature.
          train: use batch statistics and update the running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float, ``x``'s shape.
        """
        del bits
        return self.norm(jnp.asarray(x), use_running_average=not train or frozen_bn)


class ConvBN(nnx.Module):
    """``QConv -> BatchNorm -> ReLU`` (ReLU optional); its one site is the conv's input."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int] = 3,
        *,
        strides: int | tuple[int, int] = 1,
        padding: Padding | None = None,
        relu: bool = True,
        quantize_input: bool = True,
        weight_bits: int | None = 8,
        name: str = "conv",
        rngs: nnx.Rngs,
    ):
        """Builds the block; arguments as in :class:`QConv`, ``relu`` toggles the activation."""
        self.conv = QConv(
            in_features,
            out_features,
            kernel_size,
            strides=strides,
            padding=padding,
            quantize_input=quantize_input,
            weight_bits=weight_bits,
            name=name,
            rngs=rngs,
        )
        self.bn = BatchNorm(out_features, rngs=rngs)
        self.relu = relu
        self.num_sites = self.conv.num_sites
        self.site_names = self.conv.site_names

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.
          bits: int ``[B, num_sites]`` activation bit-widths, or ``None`` for full precision.
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, H', W', C_out]``.
        """
        y = self.bn(self.conv(x, bits), train=train, frozen_bn=frozen_bn)
        return jax.nn.relu(y) if self.relu else y


class BasicBlock(nnx.Module):
    """ResNet basic block (He et al., 2016): ``relu(bn2(conv2(relu(bn1(conv1 x)))) + sc(x))``.

    Sites, in forward order (PyTorch's order: the shortcut runs after the residual branch):
    ``{name}.conv1``, ``{name}.conv2`` and, when the shape changes, ``{name}.shortcut`` (a 1x1
    projection conv + BatchNorm whose input is the block input).

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        weight_bits: int | None = 8,
        name: str = "block",
        rngs: nnx.Rngs,
    ):
        """Builds the block.

        Args:
          in_features: input channels.
          out_features: output channels.
          strides: stride of ``conv1`` and of the projection shortcut.
          weight_bits: static weight bit-width for every conv (``None``: full precision).
          name: prefix of the site names, e.g. ``"stage2.block1"``.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.conv1 = ConvBN(
            in_features,
            out_features,
            3,
            strides=strides,
            weight_bits=weight_bits,
            name=f"{name}.conv1",
            rngs=rngs,
        )
        self.conv2 = ConvBN(
            out_features,
            out_features,
            3,
            relu=False,
            weight_bits=weight_bits,
            name=f"{name}.conv2",
            rngs=rngs,
        )
        if strides != 1 or in_features != out_features:
            self.shortcut = ConvBN(
                in_features,
                out_features,
                1,
                strides=strides,
                relu=False,
                weight_bits=weight_bits,
                name=f"{name}.shortcut",
                rngs=rngs,
            )
        else:
            self.shortcut = None
        self.num_sites = sum(c.num_sites for c in self._blocks())
        self.site_names = tuple(n for c in self._blocks() for n in c.site_names)

    def _blocks(self) -> list[ConvBN]:
        return [c for c in (self.conv1, self.conv2, self.shortcut) if c is not None]

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.
          bits: int ``[B, num_sites]`` activation bit-widths, or ``None`` for full precision.
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, ceil(H / s), ceil(W / s), C_out]``.
        """
        x = jnp.asarray(x)
        b = split_bits(bits, self._blocks())
        flags = dict(train=train, frozen_bn=frozen_bn)
        y = self.conv2(self.conv1(x, b[0], **flags), b[1], **flags)
        shortcut = x if self.shortcut is None else self.shortcut(x, b[2], **flags)
        return jax.nn.relu(y + shortcut)


class PreActBlock(nnx.Module):
    """Pre-activation (wide) ResNet block: ``conv2(relu(bn2(conv1(a)))) + sc``, ``a = relu(bn1 x)``.

    ``sc`` is ``x`` when the shape is kept, else a 1x1 projection conv of ``a`` (no BatchNorm),
    as in the reference WRN code. Sites, in forward order: ``{name}.conv1``, ``{name}.conv2`` and,
    when the shape changes, ``{name}.shortcut`` (same input tensor as ``conv1``, its own bits).
    Dropout between the convs is left out.

    References:
      Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        weight_bits: int | None = 8,
        name: str = "block",
        rngs: nnx.Rngs,
    ):
        """Builds the block; arguments as in :class:`BasicBlock`."""
        self.bn1 = BatchNorm(in_features, rngs=rngs)
        self.conv1 = QConv(
            in_features,
            out_features,
            3,
            strides=strides,
            weight_bits=weight_bits,
            name=f"{name}.conv1",
            rngs=rngs,
        )
        self.bn2 = BatchNorm(out_features, rngs=rngs)
        self.conv2 = QConv(
            out_features,
            out_features,
            3,
            weight_bits=weight_bits,
            name=f"{name}.conv2",
            rngs=rngs,
        )
        if strides != 1 or in_features != out_features:
            self.shortcut = QConv(
                in_features,
                out_features,
                1,
                strides=strides,
                weight_bits=weight_bits,
                name=f"{name}.shortcut",
                rngs=rngs,
            )
        else:
            self.shortcut = None
        self.num_sites = sum(c.num_sites for c in self._convs())
        self.site_names = tuple(n for c in self._convs() for n in c.site_names)

    def _convs(self) -> list[QConv]:
        return [c for c in (self.conv1, self.conv2, self.shortcut) if c is not None]

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.
          bits: int ``[B, num_sites]`` activation bit-widths, or ``None`` for full precision.
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, ceil(H / s), ceil(W / s), C_out]``, not activated: the next block
          or the network's final BatchNorm + ReLU does that.
        """
        x = jnp.asarray(x)
        b = split_bits(bits, self._convs())
        flags = dict(train=train, frozen_bn=frozen_bn)
        a = jax.nn.relu(self.bn1(x, **flags))
        y = jax.nn.relu(self.bn2(self.conv1(a, b[0]), **flags))
        y = self.conv2(y, b[1])
        shortcut = x if self.shortcut is None else self.shortcut(a, b[2])
        return y + shortcut
