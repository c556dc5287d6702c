"""The bit-width policy network pi_phi(b | x): image in, per-site logits over bit choices out.

A deliberately small, full-precision CNN (it is never quantized): strided 3x3 convolutions with
ReLU, a global average pool and one dense layer to ``L * K`` logits. Its output feeds
:mod:`ptq_adversary.policy.decode`, which masks it to the budget and samples or decodes
allocations; :func:`greedy_allocation` is the deployed (greedy) decode of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary.policy.budget import Budget
from ptq_adversary.policy.decode import greedy

__all__ = ["PolicyNet", "greedy_allocation"]


class PolicyNet(nnx.Module):
    """Small CNN mapping an image batch ``[B, H, W, C]`` to ``policy_logits [B, L, K]``.

    The output layer starts at zero (kernel and bias), so every input initially gets all-zero
    logits: after masking, each site's conditional is uniform over the allowed choices, the
    same for every input. Both the robust and the detrimental policy thus start from the same
    unbiased exploration policy rather than from a random per-input preference that RL would
    first have to unlearn. Learning is not blocked: the head's gradient is the pooled features
    times the logit gradient, which is non-zero, and the convolutions receive gradients from
    the second update on (the standard zero-init of a policy or residual head).
    """

    def __init__(
        self,
        *,
        num_sites: int,
        num_choices: int,
        in_channels: int,
        widths: Sequence[int] = (8, 16),
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          num_sites: ``L``, quantization sites of the model being quantized.
          num_choices: ``K``, bit-width choices per site.
          in_channels: image channels ``C``.
          widths: output channels of the stride-2 3x3 convolutions, in order (may be empty).
          rngs: ``nnx.Rngs`` for the convolution weights.
        """
        if num_sites < 1 or num_choices < 1:
            raise ValueError(
                f"need num_sites >= 1 and num_choices >= 1, got {num_sites}, {num_choices}"
            )
        self.num_sites = num_sites
        self.num_choices = num_choices
        convs = []
        features = in_channels
        for width in widths:
            convs.append(
                nnx.Conv(
                    features, width, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs
                )
            )
            features = width
        self.convs = nnx.List(convs)
        self.head = nnx.Linear(
            features,
            num_sites * num_choices,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Policy logits for a batch of images.

        Args:
          x: float ``[B, H, W, C]`` images (NHWC, the same preprocessing as the model's input).

        Returns:
          float32 ``[B, L, K]`` unmasked policy logits.
        """
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x).reshape(x.shape[0], self.num_sites, self.num_choices)


def greedy_allocation(
    policy_graphdef: nnx.GraphDef, *policy_states: nnx.State, images: ArrayLike, budget: Budget
) -> jax.Array:
    """The deployed allocation of a policy network: its greedy decode for each image.

    The one forward-and-decode that stage C's evaluation, the analyses and the audit's attack
    policy share. Traceable (call it inside ``jax.jit``).

    Args:
      policy_graphdef, policy_states: ``nnx.split`` of a :class:`PolicyNet` (or any module
        mapping ``[B, H, W, C]`` images to ``[B, L, K]`` logits).
      images: float ``[B, H, W, C]``, normalised like the network's input.
      budget: the static budget.

    Returns:
      int32 ``bit_idx [B, L]``: indices into ``budget.choices`` (:func:`policy.to_bits` maps them
      to bit-widths).
    """
    policy_logits_blk = nnx.merge(policy_graphdef, *policy_states)(images)
    return jax.vmap(lambda lg: greedy(lg, budget))(policy_logits_blk)
