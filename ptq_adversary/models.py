"""Model zoo (quantizable CNNs and CIFAR ResNets), its registry and the functional boundary.

Every model is an ``nnx.Module`` built from :mod:`ptq_adversary.layers` with the interface

    model(x, bits=None, *, train=False, frozen_bn=False) -> logits [B, num_classes]

where ``x`` is float32 NHWC ``[B, H, W, C]`` and ``bits`` is int ``[B, model.num_sites]`` (one
bit-width per example and site, in ``model.site_names`` order = forward order) or ``None`` for
full precision. Training and evaluation code should not call the Module directly: split it once
with :func:`split_model` and use the pure :func:`apply_model`, which jits and vmaps over a
leading policy axis of ``bits`` with ``x`` and the weights shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary.layers import (
    BasicBlock,
    BatchNorm,
    ConvBN,
    PreActBlock,
    QConv,
    QDense,
    split_bits,
)

__all__ = [
    "MODELS",
    "ConvNet",
    "Stage",
    "ResNet",
    "WideResNet",
    "INFERENCE_BRANCH_EXAMPLES",
    "MAX_INFERENCE_BRANCHES",
    "MIN_BRANCHED_BATCH",
    "apply_model",
    "batch_branches",
    "cnn",
    "count_params",
    "create_model",
    "resnet18",
    "resnet20",
    "inference_branches",
    "split_model",
    "teacher_cnn",
    "wrn16_4",
]


# A stage of an inference forward pass: ``(num_sites, fn)`` with ``fn(y, bits) -> y'`` where
# ``bits`` is int ``[B, num_sites]`` (possibly ``[B, 0]``). A model's ``stages()`` lists them in
# forward order; their site counts add up to ``model.num_sites`` and composing them from the
# image equals ``model(x, bits)`` in inference mode. The activation after a stage depends only
# on the bits of the sites up to its end, which is what lets ``ptq_adversary.audit`` share the
# work of allocations with a common prefix.
Stage = tuple[int, Callable[[jax.Array, jax.Array], jax.Array]]


def _scale(widths: Sequence[int], width: float) -> tuple[int, ...]:
    return tuple(max(1, round(w * width)) for w in widths)


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


class ConvNet(nnx.Module):
    """Plain CNN: ``ConvBN`` stack, global average pool, optional hidden dense, dense head.

    Site names: ``conv1`` .. ``conv{n}`` (``conv1`` reads the image and is not a site),
    ``fc`` (if ``hidden``), ``head``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        weight_bits: int | None = 8,
        widths: Sequence[int],
        strides: Sequence[int],
        hidden: int | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          weight_bits: static weight bit-width for every layer (``None``: full precision).
          widths: output channels of each 3x3 conv.
          strides: stride of each conv (same length as ``widths``).
          hidden: width of a ReLU dense layer before the head, or ``None`` for none.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        if len(widths) != len(strides):
            raise ValueError(f"widths {widths} and strides {strides} differ in length")
        convs = []
        c_in = in_channels
        for i, (c_out, s) in enumerate(zip(widths, strides, strict=True)):
            convs.append(
                ConvBN(
                    c_in,
                    c_out,
                    3,
                    strides=s,
                    quantize_input=i > 0,  # the image is not a site
                    weight_bits=weight_bits,
                    name=f"conv{i + 1}",
                    rngs=rngs,
                )
            )
            c_in = c_out
        self.convs = nnx.List(convs)
        if hidden is not None:
            self.fc = QDense(c_in, hidden, weight_bits=weight_bits, name="fc", rngs=rngs)
            c_in = hidden
        else:
            self.fc = None
        self.head = QDense(c_in, num_classes, weight_bits=weight_bits, name="head", rngs=rngs)
        self.num_sites = sum(b.num_sites for b in self._blocks())
        self.site_names = tuple(n for b in self._blocks() for n in b.site_names)

    def _blocks(self) -> list[nnx.Module]:
        return [*self.convs, *([self.fc] if self.fc is not None else []), self.head]

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.
          bits: int ``[B, num_sites]`` activation bit-widths in ``site_names`` order, or ``None``
            for full precision (no activation or weight quantization).
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, num_classes]`` logits.
        """
        b = split_bits(bits, self._blocks())
        y = jnp.asarray(x)
        for conv, conv_bits in zip(self.convs, b[: len(self.convs)], strict=True):
            y = conv(y, conv_bits, train=train, frozen_bn=frozen_bn)
        y = _global_avg_pool(y)
        if self.fc is not None:
            y = jax.nn.relu(self.fc(y, b[-2]))
        return self.head(y, b[-1])

    def stages(self) -> list[Stage]:
        """The inference forward pass as consecutive stages (see :data:`Stage`)."""
        out: list[Stage] = [(conv.num_sites, conv) for conv in self.convs]
        if self.fc is not None:
            out.append((1, lambda y, b: jax.nn.relu(self.fc(_global_avg_pool(y), b))))
            out.append((1, self.head))
        else:
            out.append((1, lambda y, b: self.head(_global_avg_pool(y), b)))
        return out


class ResNet(nnx.Module):
    """CIFAR-style ResNet of :class:`~ptq_adversary.layers.BasicBlock` s.

    3x3 stride-1 stem conv + BatchNorm + ReLU (no max-pool; not a site), stages of basic blocks
    (the first block of every stage but the first has stride 2; 1x1 projection shortcuts where
    the shape changes), global average pool, dense head. Site names:
    ``stage{i}.block{j}.conv1``, ``...conv2``, ``...shortcut``, ``head`` (1-based).

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        weight_bits: int | None = 8,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          weight_bits: static weight bit-width for every layer (``None``: full precision).
          stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
          widths: channels per stage; the stem has ``widths[0]``.
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        self.stem = ConvBN(
            in_channels,
            widths[0],
            3,
            quantize_input=False,
            weight_bits=weight_bits,
            name="stem",
            rngs=rngs,
        )
        blocks = []
        c_in = widths[0]
        for i, (n, c_out) in enumerate(zip(stage_sizes, widths, strict=True)):
            for j in range(n):
                blocks.append(
                    BasicBlock(
                        c_in,
                        c_out,
                        strides=2 if i > 0 and j == 0 else 1,
                        weight_bits=weight_bits,
                        name=f"stage{i + 1}.block{j + 1}",
                        rngs=rngs,
                    )
                )
                c_in = c_out
        self.blocks = nnx.List(blocks)
        self.head = QDense(c_in, num_classes, weight_bits=weight_bits, name="head", rngs=rngs)
        self.num_sites = sum(b.num_sites for b in self._blocks())
        self.site_names = tuple(n for b in self._blocks() for n in b.site_names)

    def _blocks(self) -> list[nnx.Module]:
        return [self.stem, *self.blocks, self.head]

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.
          bits: int ``[B, num_sites]`` activation bit-widths in ``site_names`` order, or ``None``
            for full precision (no activation or weight quantization).
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, num_classes]`` logits.
        """
        b = split_bits(bits, self._blocks())
        flags = dict(train=train, frozen_bn=frozen_bn)
        y = self.stem(x, b[0], **flags)
        for block, block_bits in zip(self.blocks, b[1:-1], strict=True):
            y = block(y, block_bits, **flags)
        return self.head(_global_avg_pool(y), b[-1])

    def stages(self) -> list[Stage]:
        """The inference forward pass as consecutive stages (see :data:`Stage`)."""
        return [
            (self.stem.num_sites, self.stem),
            *[(block.num_sites, block) for block in self.blocks],
            (1, lambda y, b: self.head(_global_avg_pool(y), b)),
        ]


class WideResNet(nnx.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` of pre-activation blocks (CIFAR).

    3x3 stem conv to 16 channels (not a site), three stages of ``(depth - 4) / 6``
    :class:`~ptq_adversary.layers.PreActBlock` s with ``16k, 32k, 64k`` channels (strides 1, 2,
    2), final BatchNorm + ReLU, global average pool, dense head. Site names as in
    :class:`ResNet`.

    References:
      Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        weight_bits: int | None = 8,
        depth: int = 16,
        widen_factor: int = 4,
        width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_classes: number of logits ``C``.
          in_channels: image channels.
          weight_bits: static weight bit-width for every layer (``None``: full precision).
          depth: ``6 n + 4`` for ``n`` blocks per stage.
          widen_factor: ``k``.
          width: extra multiplier on every width (tests shrink the model with it).
          rngs: ``nnx.Rngs`` with a ``params`` stream.
        """
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        stem_width, *widths = _scale(
            (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor), width
        )
        self.stem = QConv(
            in_channels,
            stem_width,
            3,
            quantize_input=False,
            weight_bits=weight_bits,
            name="stem",
            rngs=rngs,
        )
        blocks = []
        c_in = stem_width
        for i, c_out in enumerate(widths):
            for j in range(n):
                blocks.append(
                    PreActBlock(
                        c_in,
                        c_out,
                        strides=2 if i > 0 and j == 0 else 1,
                        weight_bits=weight_bits,
                        name=f"stage{i + 1}.block{j + 1}",
                        rngs=rngs,
                    )
                )
                c_in = c_out
        self.blocks = nnx.List(blocks)
        self.bn = BatchNorm(c_in, rngs=rngs)
        self.head = QDense(c_in, num_classes, weight_bits=weight_bits, name="head", rngs=rngs)
        self.num_sites = sum(b.num_sites for b in self._blocks())
        self.site_names = tuple(n for b in self._blocks() for n in b.site_names)

    def _blocks(self) -> list[nnx.Module]:
        return [self.stem, *self.blocks, self.head]

    def __call__(
        self,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        train: bool = False,
        frozen_bn: bool = False,
    ) -> jax.Array:
        """Computes logits.

        Args:
          x: float32 images ``[B, H, W, in_channels]``.
          bits: int ``[B, num_sites]`` activation bit-widths in ``site_names`` order, or ``None``
            for full precision (no activation or weight quantization).
          train: BatchNorm uses batch statistics and updates its running averages...
          frozen_bn: ...unless ``frozen_bn``, which keeps the running averages (stage B).

        Returns:
          float ``[B, num_classes]`` logits.
        """
        b = split_bits(bits, self._blocks())
        flags = dict(train=train, frozen_bn=frozen_bn)
        y = self.stem(x, b[0])
        for block, block_bits in zip(self.blocks, b[1:-1], strict=True):
            y = block(y, block_bits, **flags)
        y = jax.nn.relu(self.bn(y, **flags))
        return self.head(_global_avg_pool(y), b[-1])

    def stages(self) -> list[Stage]:
        """The inference forward pass as consecutive stages (see :data:`Stage`)."""
        return [
            (self.stem.num_sites, self.stem),
            *[(block.num_sites, block) for block in self.blocks],
            (1, lambda y, b: self.head(_global_avg_pool(jax.nn.relu(self.bn(y))), b)),
        ]


# --- Registry constructors: keyword-only (num_classes, in_channels, weight_bits, rngs) plus
# --- architecture kwargs.


def cnn(
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    widths: Sequence[int] = (16, 32, 64, 64),
    strides: Sequence[int] = (1, 2, 2, 1),
    rngs: nnx.Rngs,
) -> ConvNet:
    """Small student CNN for Fashion-MNIST on CPU (61,050 params at 28x28x1, 10 classes; 4 sites).

    conv16-BN-ReLU, conv32/2, conv64/2, conv64 (each BN-ReLU), global average pool, dense head.
    ~75-95 ms per jitted Adam train step at batch 128 on 2 CPU cores.
    """
    return ConvNet(
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        widths=widths,
        strides=strides,
        rngs=rngs,
    )


def teacher_cnn(
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    widths: Sequence[int] = (16, 64, 128, 128),
    strides: Sequence[int] = (1, 2, 2, 1),
    hidden: int | None = 256,
    rngs: nnx.Rngs,
) -> ConvNet:
    """Fashion-MNIST teacher: wide at low resolution, plus a hidden dense layer; 5 sites.

    conv16-BN-ReLU, conv64/2, conv128/2, conv128 (each BN-ReLU), global average pool,
    dense256-ReLU, dense head (~267k params at 28x28x1, 10 classes). The first conv stays at 16
    channels because on XLA:CPU the full-resolution layers dominate the step time (32 channels
    there cost ~1.3x per step for no clear gain). Measured on 2 CPU cores: ~140 ms per jitted
    Adam train step at batch 128 and 91.3% test accuracy after 5 epochs (Adam, lr 2e-3 cosine
    decay, no augmentation; the default ``cnn`` reaches 89.7% the same way).
    """
    return ConvNet(
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        widths=widths,
        strides=strides,
        hidden=hidden,
        rngs=rngs,
    )


def resnet18(
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> ResNet:
    """CIFAR ResNet-18: [2, 2, 2, 2] basic blocks of 64/128/256/512 x ``width``; 20 sites."""
    return ResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        stage_sizes=(2, 2, 2, 2),
        widths=_scale((64, 128, 256, 512), width),
        rngs=rngs,
    )


def resnet20(
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> ResNet:
    """CIFAR ResNet-20: [3, 3, 3] basic blocks of 16/32/64 x ``width``, projection shortcuts.

    21 sites: 18 block convs, 2 projection shortcuts, the head.
    """
    return ResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        stage_sizes=(3, 3, 3),
        widths=_scale((16, 32, 64), width),
        rngs=rngs,
    )


def wrn16_4(
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    width: float = 1.0,
    rngs: nnx.Rngs,
) -> WideResNet:
    """WRN-16-4 (2 pre-activation blocks per stage, 64/128/256 x ``width``); 16 sites."""
    return WideResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        depth=16,
        widen_factor=4,
        width=width,
        rngs=rngs,
    )


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "cnn": cnn,
    "teacher_cnn": teacher_cnn,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "wrn16_4": wrn16_4,
}


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None = 8,
    rngs: nnx.Rngs,
    **kwargs,
) -> nnx.Module:
    """Builds a registered model.

    Args:
      name: a key of :data:`MODELS`.
      num_classes: number of logits.
      in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
      weight_bits: static weight bit-width used whenever ``bits`` is given (``None``: full
        precision weights).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **kwargs: architecture arguments of the constructor (e.g. ``widths``, ``width``).

    Returns:
      The model, with ``num_sites`` and ``site_names``.

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    return MODELS[name](
        num_classes=num_classes,
        in_channels=in_channels,
        weight_bits=weight_bits,
        rngs=rngs,
        **kwargs,
    )


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a model once at the boundary into pure pytrees.

    Returns:
      ``(graphdef, params, rest)``: the static structure (including ``site_names``), the
      ``nnx.Param`` state (what optimizers update) and everything else (BatchNorm statistics).
    """
    return nnx.split(model, nnx.Param, ...)


#: Examples per independent branch of a quantized inference pass, per backend (see
#: :func:`inference_branches`). On XLA:CPU (jax 0.10) every per-example range reduction of the
#: activation quantizer splits the forward pass into separate conv, reduce and elementwise
#: kernels that run one after another, each over the whole batch; cutting the batch into
#: independent branches of ~16 examples lets the runtime overlap one branch's quantizer with
#: another's convolutions (default student at B = 128: 1.1-1.6x faster than one branch,
#: experiments/bench_policies.py). Backends not listed (GPU, TPU: not measured) run the whole
#: batch as one branch.
INFERENCE_BRANCH_EXAMPLES: dict[str, int] = {"cpu": 16}

#: Upper bound on the automatic branch count: the program holds one copy of the model per
#: branch, and compile time grows with it (eval step of the default student: ~3 s with one
#: branch, ~3.5 s with 4, ~7 s with 8, ~11 s with 16, measured once). In the runs of
#: experiments/bench_policies.py on 2026-11-30, 64-256 policies at B = 128 cost 0.70-1.00x
#: the limit (P FP passes) with 8 branches and 1.18-1.30x with 4.
MAX_INFERENCE_BRANCHES = 8

#: Smallest batch that is split automatically: below it a pass takes a few milliseconds, and
#: the extra compile time of the branch copies (seconds per program) outweighs the gain in
#: short jobs (the smoke configs and tests evaluate 64 examples or fewer).
MIN_BRANCHED_BATCH = 128


def inference_branches(batch: int, backend: str | None = None) -> int:
    """The default number of batch branches for a quantized inference pass over ``batch``.

    Args:
      batch: ``B``, examples in the pass (per policy when vmapped over policies).
      backend: ``jax.default_backend()`` if None.

    Returns:
      ``round(B / INFERENCE_BRANCH_EXAMPLES[backend])`` clipped to
      ``[1, MAX_INFERENCE_BRANCHES]``; 1 for backends without an entry and for
      ``B < MIN_BRANCHED_BATCH``.
    """
    target = INFERENCE_BRANCH_EXAMPLES.get(backend or jax.default_backend())
    if target is None or batch < MIN_BRANCHED_BATCH:
        return 1
    return max(1, min(MAX_INFERENCE_BRANCHES, round(batch / target)))


def apply_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x: ArrayLike,
    bits: ArrayLike | None = None,
    *,
    train: bool = False,
    frozen_bn: bool = False,
    branches: int | None = None,
) -> tuple[jax.Array, nnx.State]:
    """Pure forward pass of a split model; jittable, differentiable and vmappable.

    Args:
      graphdef: from :func:`split_model`.
      params: parameter state from :func:`split_model` (or updated by an optimizer).
      rest: non-parameter state (BatchNorm statistics).
      x: float32 ``[B, H, W, C]`` images.
      bits: int ``[B, L]`` activation bit-widths (``L = model.num_sites``), or ``None`` for
        full precision (static choice). To evaluate ``P`` policies at once, ``jax.vmap`` this
        function over a ``[P, B, L]`` array with everything else shared
        (``in_axes=(None, None, None, None, 0)``).
      train: static; use batch statistics unless ``frozen_bn``.
      frozen_bn: static; with ``train``, keep BatchNorm on its running statistics (stage B).
      branches: static; split the batch into this many parts computed as independent
        branches of one program and concatenated. Every op of an inference pass is per
        example, so only the schedule changes: the logits equal the unsplit pass up to the
        float rounding of differently sized convolutions (tests/test_models.py; bit-identical
        for the default student on 28x28 inputs, experiments/bench_policies.py checks). ``None``:
        :func:`inference_branches` for quantized inference (``bits`` given, ``train=False``),
        else 1 (full-precision passes are one fused kernel on XLA:CPU and gain nothing).
        Values above ``B`` are clipped to ``B``; a value > 1 with batch statistics
        (``train and not frozen_bn``) is an error.

    Returns:
      ``(logits, new_rest)``: float ``[B, num_classes]`` and the updated non-parameter state,
      which differs from ``rest`` only when ``train and not frozen_bn``.
    """
    if branches is None:
        batch = jnp.shape(x)[0] if jnp.ndim(x) else 0
        branches = 1 if bits is None or train else inference_branches(batch)
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if branches > 1 and train and not frozen_bn:
        raise ValueError(
            "branches > 1 needs per-example computation, but train=True without frozen_bn "
            "normalizes with batch statistics (which would differ per branch)"
        )
    if branches > 1:  # batch_branches clips to B; inference and frozen BN leave `rest` as is
        fn = lambda x, b: _apply(graphdef, params, rest, x, b, train=train, frozen_bn=frozen_bn)[0]
        return batch_branches(fn, branches, x, bits), rest
    return _apply(graphdef, params, rest, x, bits, train=train, frozen_bn=frozen_bn)


def batch_branches(fn: Callable[..., Any], branches: int, *args: ArrayLike | None) -> Any:
    """``fn(*args)`` computed as ``branches`` independent parts of the leading axis.

    Each array in ``args`` (``None`` passes through) is cut along axis 0 with
    ``jnp.array_split``; ``fn`` runs once per part, unrolled into the traced program, and every
    leaf of its pytree output is concatenated back along axis 0. Correct only for ``fn`` that
    treats examples independently (inference, frozen BatchNorm); see :func:`apply_model`.

    Args:
      fn: ``(*parts) -> pytree`` of arrays with the parts' leading axis.
      branches: number of parts, clipped to ``[1, B]``.
      *args: arrays ``[B, ...]`` sharing ``B``, or ``None``.

    Returns:
      ``fn``'s pytree over all ``B`` examples.
    """
    arrays = [None if a is None else jnp.asarray(a) for a in args]
    batch = next(a.shape[0] for a in arrays if a is not None)
    branches = max(1, min(branches, batch))
    if branches == 1:
        return fn(*arrays)
    split = [[None] * branches if a is None else jnp.array_split(a, branches) for a in arrays]
    outs = [fn(*parts) for parts in zip(*split, strict=True)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def _apply(graphdef, params, rest, x, bits, *, train, frozen_bn):
    # copy=True: fresh Variables in the current trace, so BatchNorm updates neither touch the
    # caller's `rest` (purity) nor trip NNX's trace-level check under jax.grad inside jax.jit.
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x, bits, train=train, frozen_bn=frozen_bn)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return logits, new_rest


def count_params(params: nnx.State) -> int:
    """Total number of scalar parameters in a parameter state (or any pytree of arrays).

    Reads shapes only, so it also counts abstract states, e.g. from
    ``split_model(nnx.eval_shape(lambda: create_model(...)))``, without initializing anything.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
