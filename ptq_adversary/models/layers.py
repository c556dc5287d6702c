"""Layer constructors and residual blocks of the built-in networks (plain ``flax.nnx``).

Convs are bias-free (BatchNorm follows them), He-normal initialized, and pad ``k // 2`` on every
side (PyTorch's ``padding=k // 2``), which differs from XLA's ``"SAME"`` at stride 2. Dense
layers are LeCun-normal initialized with a zero bias. BatchNorm is ``nnx.BatchNorm``
(momentum 0.9, epsilon 1e-5, i.e. PyTorch's momentum 0.1), created in training mode; ``.eval()``
/ ``.train()`` on any module containing it switch its ``use_running_average``.

The blocks document their conv order (the program order of their sites); the networks built
from them are in :mod:`ptq_adversary.models.networks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

__all__ = [
    "BasicBlock",
    "ConvBN",
    "PreActBlock",
    "batch_norm",
    "conv",
    "dense",
    "scale_widths",
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


def scale_widths(widths: Sequence[int], width: float) -> tuple[int, ...]:
    """Channel widths times a multiplier, rounded, at least 1 each (how tests shrink models).

    Args:
      widths: channel counts.
      width: the multiplier.

    Returns:
      ``tuple(max(1, round(w * width)) for w in widths)``.
    """
    return tuple(max(1, round(w * width)) for w in widths)


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
