"""Plain model zoo: the project's CNNs and CIFAR ResNets as ordinary ``flax.nnx`` modules.

Every network here is a standard ``nnx.Module`` with the interface

    model(x) -> logits [B, num_classes]

where ``x`` is float32 NHWC ``[B, H, W, C]``. There is no bit-width argument and no train flag:

* Quantization is not part of the modules. It is derived from the traced program, in which
  every ``conv_general_dilated`` / ``dot_general`` is a conv or dense layer; their order in
  the program is the forward order documented on each class (the first conv reads the image
  and is not a quantization site, every later conv/dense is one). The weight bit-width belongs
  to the quantized program (``models.QuantizedModel``), not to the network.
* BatchNorm is ``nnx.BatchNorm`` (momentum 0.9, epsilon 1e-5, i.e. PyTorch's momentum 0.1).
  A fresh model is in training mode (batch statistics, running averages updated on every
  call); ``model.eval()`` switches every BatchNorm to its running averages and ``model.train()``
  back, through their ``use_running_average`` attribute.

Convs are bias-free (BatchNorm follows them), He-normal initialized, and pad ``k // 2`` on every
side (PyTorch's ``padding=k // 2``), which differs from XLA's ``"SAME"`` at stride 2. Dense
layers are LeCun-normal initialized with a zero bias.

Attribute names are chosen so that parameter paths read as layer names: ``conv2/kernel``,
``layer2/0/conv1/kernel``, ``layer2/0/shortcut/kernel``, ``head/kernel``.

:data:`ZOO` maps the registry names to constructors with the keyword signature
``(num_classes, in_channels, <architecture kwargs>, rngs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

__all__ = [
    "ZOO",
    "BasicBlock",
    "ConvBN",
    "ConvNet",
    "PreActBlock",
    "ResNet",
    "WideResNet",
    "batch_norm",
    "cnn",
    "conv",
    "dense",
    "resnet18",
    "resnet20",
    "teacher_cnn",
    "wrn16_4",
]

# He init suits convs followed by BatchNorm + ReLU (what torchvision's ResNets use as well).
_CONV_INIT = nnx.initializers.he_normal()
_DENSE_INIT = nnx.initializers.lecun_normal()

# PyTorch's BatchNorm momentum 0.1 (flax counts the other way): short CIFAR/Fashion-MNIST runs
# need running statistics that catch up within a few hundred steps.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


# --- Layer constructors.


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free, He-initialized 2-D conv (NHWC input, HWIO kernel) padding ``k // 2``.

    The padding is explicit ``((k // 2, k // 2), (k // 2, k // 2))``: equal to ``"SAME"`` at
    stride 1, but symmetric at stride 2, where ``"SAME"`` pads ``(0, 1)``.

    Args:
      in_features: input channels ``C_in``.
      out_features: output channels ``C_out``.
      kernel_size: ``k`` (square kernel ``[k, k, C_in, C_out]``).
      strides: stride ``s`` along both spatial axes.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Returns:
      ``nnx.Conv`` mapping ``[B, H, W, C_in]`` to ``[B, ceil(H / s), ceil(W / s), C_out]``
      (for odd ``k``).
    """
    pad = kernel_size // 2
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        rngs=rngs,
    )


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A LeCun-initialized dense layer ``x @ W + b`` (``W: [F_in, F_out]``, zero-initialized ``b``).

    Args:
      in_features: input features ``F_in``.
      out_features: output features ``F_out``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Returns:
      ``nnx.Linear`` mapping ``[B, F_in]`` to ``[B, F_out]``.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=True,
        kernel_init=_DENSE_INIT,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the last axis (``C``), momentum 0.9, epsilon 1e-5, in training mode.

    Args:
      num_features: channels ``C``.
      rngs: ``nnx.Rngs`` (BatchNorm draws nothing from it).

    Returns:
      ``nnx.BatchNorm`` with ``use_running_average=False``; ``.eval()`` on it or on any module
      containing it sets that to ``True``.
    """
    return nnx.BatchNorm(
        num_features,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        use_running_average=False,
        rngs=rngs,
    )


def _scale(widths: Sequence[int], width: float) -> tuple[int, ...]:
    return tuple(max(1, round(w * width)) for w in widths)


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


# --- Blocks.


class ConvBN(nnx.Module):
    """``conv -> BatchNorm -> ReLU`` (ReLU optional), a reusable block.

    The registry networks keep their conv / BatchNorm pairs flat instead (``conv1`` + ``bn1``),
    so that kernel paths stay short; this block is for building other models.

    Attributes:
      conv: the ``nnx.Conv`` (see :func:`conv`).
      bn: the ``nnx.BatchNorm`` (see :func:`batch_norm`).
      relu: whether the ReLU is applied.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        *,
        strides: int = 1,
        relu: bool = True,
        rngs: nnx.Rngs,
    ):
        """Builds the block.

        Args:
          in_features: input channels ``C_in``.
          out_features: output channels ``C_out``.
          kernel_size: ``k``.
          strides: ``s``.
          relu: apply a ReLU after the BatchNorm.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.conv = conv(in_features, out_features, kernel_size, strides=strides, rngs=rngs)
        self.bn = batch_norm(out_features, rngs=rngs)
        self.relu = relu

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.

        Returns:
          float ``[B, ceil(H / s), ceil(W / s), C_out]``.
        """
        y = self.bn(self.conv(jnp.asarray(x)))
        return jax.nn.relu(y) if self.relu else y


class BasicBlock(nnx.Module):
    """ResNet basic block (He et al., 2016): ``relu(bn2(conv2(relu(bn1(conv1 x)))) + sc(x))``.

    ``sc`` is the identity when the shape is kept, else a 1x1 projection conv with stride ``s``
    followed by BatchNorm (``shortcut``, ``shortcut_bn``), applied to the block input. Forward
    order of the convs (PyTorch's order: the shortcut runs after the residual branch):
    ``conv1``, ``conv2``, ``shortcut``.

    Attributes:
      conv1, bn1: 3x3 conv with stride ``s`` and its BatchNorm.
      conv2, bn2: 3x3 conv and its BatchNorm.
      shortcut, shortcut_bn: 1x1 projection conv and BatchNorm, or both ``None``.

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the block.

        Args:
          in_features: input channels ``C_in``.
          out_features: output channels ``C_out``.
          strides: stride ``s`` of ``conv1`` and of the projection shortcut.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.conv1 = conv(in_features, out_features, 3, strides=strides, rngs=rngs)
        self.bn1 = batch_norm(out_features, rngs=rngs)
        self.conv2 = conv(out_features, out_features, 3, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs=rngs)
        if strides != 1 or in_features != out_features:
            self.shortcut = conv(in_features, out_features, 1, strides=strides, rngs=rngs)
            self.shortcut_bn = batch_norm(out_features, rngs=rngs)
        else:
            self.shortcut = None
            self.shortcut_bn = None

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.

        Returns:
          float ``[B, ceil(H / s), ceil(W / s), C_out]``.
        """
        x = jnp.asarray(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return jax.nn.relu(y + shortcut)


class PreActBlock(nnx.Module):
    """Pre-activation (wide) ResNet block: ``conv2(relu(bn2(conv1(a)))) + sc``, ``a = relu(bn1 x)``.

    ``sc`` is ``x`` when the shape is kept, else a 1x1 projection conv of ``a`` with stride
    ``s`` and no BatchNorm, as in the reference WRN code. Forward order of the convs:
    ``conv1``, ``conv2``, ``shortcut``. Dropout between the convs is left out.

    Attributes:
      bn1: BatchNorm of the block input.
      conv1: 3x3 conv with stride ``s``.
      bn2: BatchNorm of ``conv1``'s output.
      conv2: 3x3 conv.
      shortcut: 1x1 projection conv, or ``None``.

    References:
      Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the block; arguments as in :class:`BasicBlock`."""
        self.bn1 = batch_norm(in_features, rngs=rngs)
        self.conv1 = conv(in_features, out_features, 3, strides=strides, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs=rngs)
        self.conv2 = conv(out_features, out_features, 3, rngs=rngs)
        if strides != 1 or in_features != out_features:
            self.shortcut = conv(in_features, out_features, 1, strides=strides, rngs=rngs)
        else:
            self.shortcut = None

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Applies the block.

        Args:
          x: float ``[B, H, W, C_in]``.

        Returns:
          float ``[B, ceil(H / s), ceil(W / s), C_out]``, not activated: the next block or the
          network's final BatchNorm + ReLU does that.
        """
        x = jnp.asarray(x)
        a = jax.nn.relu(self.bn1(x))
        y = jax.nn.relu(self.bn2(self.conv1(a)))
        y = self.conv2(y)
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return y + shortcut


# --- Networks.


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
        stem_width, *widths = _scale(
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


# --- Registry constructors: keyword-only (num_classes, in_channels, rngs) plus
# --- architecture kwargs.


def cnn(
    *,
    num_classes: int,
    in_channels: int,
    widths: Sequence[int] = (16, 32, 64, 64),
    strides: Sequence[int] = (1, 2, 2, 1),
    rngs: nnx.Rngs,
) -> ConvNet:
    """Small student CNN for Fashion-MNIST (61,050 params at 28x28x1, 10 classes).

    conv16-BN-ReLU, conv32/2, conv64/2, conv64 (each BN-ReLU), global average pool, dense head.
    """
    return ConvNet(
        num_classes=num_classes,
        in_channels=in_channels,
        widths=widths,
        strides=strides,
        rngs=rngs,
    )


def teacher_cnn(
    *,
    num_classes: int,
    in_channels: int,
    widths: Sequence[int] = (16, 64, 128, 128),
    strides: Sequence[int] = (1, 2, 2, 1),
    hidden: int | None = 256,
    rngs: nnx.Rngs,
) -> ConvNet:
    """Fashion-MNIST teacher: wide at low resolution, plus a hidden dense layer.

    conv16-BN-ReLU, conv64/2, conv128/2, conv128 (each BN-ReLU), global average pool,
    dense256-ReLU, dense head (~267k params at 28x28x1, 10 classes).
    """
    return ConvNet(
        num_classes=num_classes,
        in_channels=in_channels,
        widths=widths,
        strides=strides,
        hidden=hidden,
        rngs=rngs,
    )


def resnet18(
    *,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> ResNet:
    """CIFAR ResNet-18: [2, 2, 2, 2] basic blocks of 64/128/256/512 x ``width``."""
    return ResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        stage_sizes=(2, 2, 2, 2),
        widths=_scale((64, 128, 256, 512), width),
        rngs=rngs,
    )


def resnet20(
    *,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> ResNet:
    """CIFAR ResNet-20: [3, 3, 3] basic blocks of 16/32/64 x ``width``, projection shortcuts.

    22 convs / dense layers: the stem, 18 block convs, 2 projection shortcuts, the head.
    """
    return ResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        stage_sizes=(3, 3, 3),
        widths=_scale((16, 32, 64), width),
        rngs=rngs,
    )


def wrn16_4(
    *,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> WideResNet:
    """WRN-16-4 (2 pre-activation blocks per stage, 64/128/256 x ``width``)."""
    return WideResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        depth=16,
        widen_factor=4,
        width=width,
        rngs=rngs,
    )


ZOO: dict[str, Callable[..., nnx.Module]] = {
    "cnn": cnn,
    "teacher_cnn": teacher_cnn,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "wrn16_4": wrn16_4,
}
