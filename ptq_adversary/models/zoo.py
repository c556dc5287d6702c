"""The built-in networks by name: the registry constructors and :data:`ZOO`.

Each constructor is keyword-only, ``(num_classes, in_channels, <architecture kwargs>, rngs)``,
and returns a plain ``nnx.Module`` ``net(x [B, H, W, C]) -> logits [B, num_classes]`` of one of
the architectures in :mod:`ptq_adversary.models.networks` (re-exported here, with their forward
orders and parameter paths documented there). :data:`ZOO` maps the registry names to the
constructors; ``models.create_model`` builds from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx

from ptq_adversary.models.layers import scale_widths
from ptq_adversary.models.networks import ConvNet, ResNet, WideResNet

__all__ = [
    "ZOO",
    "ConvNet",
    "ResNet",
    "WideResNet",
    "cnn",
    "resnet18",
    "resnet20",
    "teacher_cnn",
    "wrn16_4",
]


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
        widths=scale_widths((64, 128, 256, 512), width),
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
        widths=scale_widths((16, 32, 64), width),
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
