"""Evaluation of the audited network: its FP and quantized forward passes, the checks of the
audit's inputs, and the adapter every method's model goes through.

Shapes: ``B`` examples, ``L`` sites, ``C`` allocations evaluated at once; the network is frozen
and runs in inference mode (:func:`~ptq_adversary.models.apply_model`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import data
from ptq_adversary.models import QuantizedModel, apply_model, as_quantized_model, split_model

__all__ = [
    "audited_model",
    "check_inputs",
    "check_labels",
    "eval_per_example",
    "evaluate_allocations",
    "fp_eval",
    "infer_num_classes",
    "loss_and_correct",
]


def loss_and_correct(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and correctness of ``logits [..., B, K]`` against int ``labels [B]``:
    float32 and bool ``[..., B]``."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, jnp.argmax(logits, -1) == labels


@functools.partial(jax.jit, static_argnums=(0,))
def fp_eval(graphdef, params, rest, images, labels):
    """The full-precision pass of a split model (:func:`~ptq_adversary.models.split_model`).

    Args:
      graphdef, params, rest: the split model (``graphdef`` static).
      images: float ``[B, H, W, C]``; labels: int ``[B]``.

    Returns:
      ``(loss, correct, margin)``: float32, bool and float32 ``[B]``; the margin is the true
      class's logit minus the best other logit (negative when the prediction is wrong).
    """
    logits, _ = apply_model(graphdef, params, rest, images)
    loss, correct = loss_and_correct(logits, labels)
    top2 = jax.lax.top_k(logits, 2)[0]
    true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    other = jnp.where(jnp.argmax(logits, -1) == labels, top2[:, 1], top2[:, 0])
    return loss, correct, true - other


@functools.partial(jax.jit, static_argnums=(0,))
def eval_per_example(graphdef, params, rest, images, labels, bits_cbl):
    """Quantized loss and correctness of ``C`` per-example allocations ``bits [C, B, L]``.

    Returns:
      ``(loss, correct)``: float32 and bool ``[C, B]``.
    """

    def one(bits_bl):
        logits, _ = apply_model(graphdef, params, rest, images, bits_bl)
        return loss_and_correct(logits, labels)

    return jax.vmap(one)(bits_cbl)


def audited_model(model, images, params, weight_bits, quantize_first) -> QuantizedModel:
    """The audited network as a :class:`QuantizedModel` described at the images' shape.

    Args:
      model: an ``nnx.Module``, a function ``fn(params, x)`` (with ``params``) or a
        :class:`QuantizedModel` (re-described if its input shape differs).
      images: ``[B, ...]``: the per-example shape ``images.shape[1:]`` is the model's input.
      params, weight_bits, quantize_first: as in
        :func:`~ptq_adversary.models.as_quantized_model`.

    Raises:
      TypeError: ``params`` given with a :class:`QuantizedModel` (which carries its state).
    """
    shape = np.shape(images)[1:]
    if isinstance(model, QuantizedModel):
        if params is not None:
            raise TypeError("params= goes with a function; a QuantizedModel carries its state")
        if model.input_shape == tuple(shape):
            return model
        weight_bits, quantize_first, model = model.weight_bits, model.quantize_first, model.net
    return as_quantized_model(
        model,
        input_shape=shape,
        params=params,
        weight_bits=weight_bits,
        quantize_first=quantize_first,
    )


def infer_num_classes(model: nnx.Module, images: np.ndarray) -> int:
    """The model's number of classes, from its FP forward pass on one image (shapes only).

    Args:
      model: a :class:`QuantizedModel`; images: ``[B, ...]`` (only the shape is used).

    Raises:
      ValueError: the model rejects images of this shape (a wrong channel count or size),
        with the model's own error as the cause.
    """
    graphdef, params, rest = split_model(model)
    one = jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    try:  # the pure FP forward of the audit itself (fp_eval): nothing is mutated
        out = jax.eval_shape(lambda x: apply_model(graphdef, params, rest, x)[0], one)
    except Exception as err:  # noqa: BLE001 (any failure here is the input's shape)
        raise ValueError(
            f"the model rejected images of shape {tuple(images.shape)} (per example "
            f"{tuple(images.shape[1:])}: check the channel count and image size the model "
            f"was built for): {err}"
        ) from err
    return int(out.shape[-1])


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Raises ValueError unless every label ``[B]`` is in ``[0, num_classes)``."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def check_inputs(images: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checks an audit's inputs: float ``[B, H, W, C]`` finite images, ``B >= 1``, and integer
    labels ``[B]``.

    Returns:
      ``(images, labels)`` as float32 and int32 numpy arrays.

    Raises:
      ValueError: naming what is wrong (shape, dtype, an empty batch, NaN or inf values).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one example, got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [B] = [{images.shape[0]}], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        # A cast would truncate float labels (2.7 -> class 2) without a word.
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be float (normalized as the model expects), got {images.dtype}"
        )
    data.check_finite_images(images)
    return images.astype(np.float32), labels.astype(np.int32)


def evaluate_allocations(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    bits: ArrayLike,
    *,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantized loss and correctness of one allocation per example (``bits [B, L]``).

    Returns:
      float32 and bool numpy ``[B]``.
    """
    graphdef, params, rest = split_model(model)
    images, labels = check_inputs(images, labels)
    bits = np.asarray(bits, np.int32)
    out = [
        eval_per_example(
            graphdef,
            params,
            rest,
            jnp.asarray(images[i : i + chunk]),
            jnp.asarray(labels[i : i + chunk]),
            jnp.asarray(bits[None, i : i + chunk]),
        )
        for i in range(0, len(images), chunk)
    ]
    return (
        np.concatenate([np.asarray(o[0][0]) for o in out]),
        np.concatenate([np.asarray(o[1][0]) for o in out]),
    )
