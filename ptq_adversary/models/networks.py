"""The architectures of the built-in networks: a plain CNN, a CIFAR ResNet, a Wide ResNet.

Every network is a standard ``nnx.Module`` with the interface

    model(x) -> logits [B, num_classes]

where ``x`` is float32 NHWC ``[B, H, W, C]``. There is no bit-width argument and no train flag:

* Quantization is not part of the modules. It is derived from the traced program, in which
  every ``conv_general_dilated`` / ``dot_general`` is a conv or dense layer; their order in
  the program is the forward order documented on each class (the first conv reads the image
  and is not a quantization site, every later conv/dense is one). The weight bit-width belongs
  to the quantized program (``models.QuantizedModel``), not to the network.
* A fresh model is in training mode (batch statistics, running averages updated on every
  call); ``model.eval()`` switches every BatchNorm to its running averages and ``model.train()``
  back (:mod:`ptq_adversary.models.layers` has the layer conventions).

Attribute names are chosen so that parameter paths read as layer names: ``conv2/kernel``,
``layer2/0/conv1/kernel``, ``layer2/0/shortcut/kernel``, ``head/kernel``. The named
configurations (``cnn``, ``resnet20``, ...) are in :mod:`ptq_adversary.models.zoo`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary.models.layers import (
    BasicBlock,
    PreActBlock,
    batch_norm,
    conv,
    dense,
    scale_widths,
)

__all__ = ["ConvNet", "ResNet", "WideResNet"]


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


class ConvNet(nnx.Module):
    """Plain CNN: conv-BN-ReLU stack, global average pool, optional hidden dense, dense head.

    Forward order of the convs / dense layers: ``conv1`` .. ``conv{n}``, ``fc`` (if
    ``hidden``), ``head``.

    Attributes:
      conv1 .. conv{n}: 3x3 convs (``nnx.Conv``).
      bn1 .. bn{n}: their BatchNorms.
      fc: hidden ``nnx.Linear`` followed by ReLU, or ``None``.
      head: output ``nnx.Linear``.
      depth: ``n``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        strides: Sequence[int],
        hidden: int | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          widths: output channels of each 3x3 conv.
          strides: stride of each conv (same length as ``widths``).
          hidden: width of a ReLU dense layer before the head, or ``None`` for none.
          rngs: ``nnx.Rngs`` with a ``params`` stream.

        Raises:
          ValueError: if ``widths`` and ``strides`` differ in length.
        """
        if len(widths) != len(strides):
            raise ValueError(f"widths {widths} and strides {strides} differ in length")
        self.depth = len(widths)
        c_in = in_channels
        for i, (c_out, s) in enumerate(zip(widths, strides, strict=True)):
            setattr(self, f"conv{i + 1}", conv(c_in, c_out, 3, strides=s, rngs=rngs))
            setattr(self, f"bn{i + 1}", batch_norm(c_out, rngs=rngs))
            c_in = c_out
        if hidden is not None:
            self.fc = dense(c_in, hidden, rngs=rngs)
            c_in = hidden
        else:
            self.fc = None
        self.head = dense(c_in, num_classes, rngs=rngs)

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.

        Returns:
          float ``[B, num_classes]`` logits.
        """
        y = jnp.asarray(x)
        for i in range(1, self.depth + 1):
            y = jax.nn.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y)))
        y = _global_avg_pool(y)
        if self.fc is not None:
            y = jax.nn.relu(self.fc(y))
        return self.head(y)


class ResNet(nnx.Module):
    """CIFAR-style ResNet of :class:`BasicBlock` s.

    3x3 stride-1 stem conv + BatchNorm + ReLU (no max-pool), stages ``layer1`` .. ``layer{S}``
    of basic blocks (the first block of every stage but the first has stride 2; 1x1 projection
    shortcuts where the shape changes), global average pool, dense head. Forward order of the
    convs / dense layers: ``stem``, then per block ``conv1``, ``conv2``, ``shortcut``, then
    ``head``.

    Attributes:
      stem, stem_bn: stem conv and its BatchNorm.
      layer1 .. layer{S}: ``nnx.List`` of :class:`BasicBlock` per stage.
      head: output ``nnx.Linear``.
      stage_sizes: blocks per stage.

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
          widths: channels per stage; the stem has ``widths[0]``.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.stage_sizes = tuple(stage_sizes)
        self.stem = conv(in_channels, widths[0], 3, rngs=rngs)
        self.stem_bn = batch_norm(widths[0], rngs=rngs)
        c_in = widths[0]
        for i, (n, c_out) in enumerate(zip(stage_sizes, widths, strict=True)):
            blocks = []
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, strides=strides, rngs=rngs))
                c_in = c_out
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.head = dense(c_in, num_classes, rngs=rngs)

    def stage_layers(self) -> list[nnx.List]:
        """The stages ``[layer1, ..., layer{S}]``, each an ``nnx.List`` of blocks."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.stage_sizes))]

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.

        Returns:
          float ``[B, num_classes]`` logits.
        """
        y = jax.nn.relu(self.stem_bn(self.stem(jnp.asarray(x))))
        for stage in self.stage_layers():
            for block in stage:
                y = block(y)
        return self.head(_global_avg_pool(y))


class WideResNet(nnx.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` of pre-activation blocks (CIFAR).

    3x3 stem conv to 16 channels (no BatchNorm of its own), three stages ``layer1`` ..
    ``layer3`` of ``(depth - 4) / 6`` :class:`PreActBlock` s with ``16k, 32k, 64k`` channels
    (strides 1, 2, 2), final BatchNorm + ReLU, global average pool, dense head. Forward order of
    the convs / dense layers: ``stem``, then per block ``conv1``, ``conv2``, ``shortcut``, then
    ``head``.

    Attributes:
      stem: stem conv.
      layer1 .. layer3: ``nnx.List`` of :class:`PreActBlock` per stage.
      bn: final BatchNorm.
      head: output ``nnx.Linear``.

    References:
      Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        depth: int = 16,
        widen_factor: int = 4,
        width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          depth: ``6 n + 4`` for ``n`` blocks per stage.
          widen_factor: ``k``.
          width: extra multiplier on every width (tests shrink the model with it).
          rngs: ``nnx.Rngs`` with a ``params`` stream.

        Raises:
          ValueError: if ``depth`` is not ``6 n + 4`` with ``n >= 1``.
        """
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        stem_width, *widths = scale_widths(
            (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor), width
        )
        self.stem = conv(in_channels, stem_width, 3, rngs=rngs)
        c_in = stem_width
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, strides=strides, rngs=rngs))
                c_in = c_out
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.bn = batch_norm(c_in, rngs=rngs)
        self.head = dense(c_in, num_classes, rngs=rngs)

    def stage_layers(self) -> list[nnx.List]:
        """The stages ``[layer1, layer2, layer3]``, each an ``nnx.List`` of blocks."""
        return [self.layer1, self.layer2, self.layer3]

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.

        Returns:
          float ``[B, num_classes]`` logits.
        """
        y = self.stem(jnp.asarray(x))
        for stage in self.stage_layers():
            for block in stage:
                y = block(y)
        y = jax.nn.relu(self.bn(y))
        return self.head(_global_avg_pool(y))
