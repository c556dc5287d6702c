"""A user's own architecture for the ``model.factory`` tests: plain NNX, no ptq_adversary code."""

import jax
from flax import nnx


class SmallNet(nnx.Module):
    """conv (reads the image) -> BN -> ReLU -> conv -> ReLU -> mean pool -> dense: 2 sites."""

    def __init__(self, *, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, width, (3, 3), strides=2, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.head(jax.nn.relu(self.conv2(x)).mean(axis=(1, 2)))


def build(*, num_classes: int, in_channels: int, rngs: nnx.Rngs, width: int = 4) -> SmallNet:
    """What ``--config.model.factory=user_model:build`` calls."""
    return SmallNet(num_classes=num_classes, in_channels=in_channels, width=width, rngs=rngs)


class OneLayer(nnx.Module):
    """A linear classifier on pooled pixels: its only dense layer reads the image: no site."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(x.mean(axis=(1, 2)))


def build_one_layer(*, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> OneLayer:
    """A factory whose model the transform refuses (no quantization site)."""
    return OneLayer(num_classes=num_classes, in_channels=in_channels, rngs=rngs)
