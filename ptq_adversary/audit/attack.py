"""The ``policy`` method: an input-conditioned attack policy trained against the frozen network.

The pipeline's bit-width policy (:class:`~ptq_adversary.policy.PolicyNet`) trained by
REINFORCE to maximise the frozen network's quantized loss (:func:`train_policy`), then deployed
greedily (:func:`policy_allocations`): the damage a *deployable* policy (a function of the
input) achieves, as opposed to a per-example oracle.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from ptq_adversary import metrics, policy, steps
from ptq_adversary.audit import evaluate
from ptq_adversary.models import split_model
from ptq_adversary.policy import PolicyNet, greedy_allocation

__all__ = ["PolicyConfig", "policy_allocations", "train_policy"]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """REINFORCE training of an input-conditioned policy against the frozen network.

    Attributes:
      steps: policy updates.
      batch_size: inputs per update.
      num_samples: ``P`` allocations sampled per input (leave-one-out baseline, ``P >= 2``).
      learning_rate: Adam step size.
      entropy_coef: weight of the entropy bonus.
      widths: the policy network's conv widths (:class:`~ptq_adversary.policy.PolicyNet`).
    """

    steps: int = 300
    batch_size: int = 64
    num_samples: int = 8
    learning_rate: float = 3e-3
    entropy_coef: float = 0.01
    widths: tuple[int, ...] = (8, 16)


def train_policy(
    model: nnx.Module,
    images: ArrayLike,
    labels: ArrayLike,
    budget: policy.Budget,
    config: PolicyConfig = PolicyConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
) -> nnx.Module:
    """Trains the pipeline's bit-width policy to maximise the frozen network's quantized loss.

    The stage-B step of the pipeline (:func:`steps.make_pair_train_step`, detrimental mode,
    reward ``CE(f_q(x; b), y)`` against the true labels) with the network's update switched off
    (``optax.set_to_zero`` and a zero quantized-loss weight): only the policy learns.

    Args:
      model: the frozen network (``bits`` interface).
      images: float ``[N, H, W, C]`` training inputs (normalized); labels: int ``[N]``.
      budget: the :class:`policy.Budget`.
      config: a :class:`PolicyConfig`.
      seed: seeds the policy's initialisation, the batch order and the sampled allocations.
      progress: show a progress bar.

    Returns:
      The trained :class:`~ptq_adversary.policy.PolicyNet`.
    """

    images, labels = evaluate.check_inputs(images, labels)
    graphdef, params, rest = split_model(model)
    pol = PolicyNet(
        num_sites=budget.num_sites,
        num_choices=budget.num_choices,
        in_channels=images.shape[-1],
        widths=config.widths,
        rngs=nnx.Rngs(seed),
    )
    pol_graphdef, pol_params, pol_rest = nnx.split(pol, nnx.Param, ...)
    frozen, pol_opt = optax.set_to_zero(), optax.adam(config.learning_rate)
    state = steps.create_pair_state(params, rest, frozen, pol_params, pol_rest, pol_opt, seed)
    step = jax.jit(
        steps.make_pair_train_step(
            graphdef,
            pol_graphdef,
            frozen,
            pol_opt,
            budget,
            mode="detrimental",
            num_samples=config.num_samples,
            temperature=1.0,
            quant_weight=0.0,
            margin=0.0,
            reward="ce",
            entropy_coef=config.entropy_coef,
        )
    )
    num_classes = evaluate.infer_num_classes(model, np.asarray(images[:1]))
    rng = np.random.default_rng(seed)
    batch = min(config.batch_size, len(images))
    with metrics.progress_bar(config.steps, desc="audit policy", disable=not progress) as bar:
        for _ in range(config.steps):
            idx = rng.choice(len(images), batch, replace=False)
            target = jax.nn.one_hot(labels[idx], num_classes)  # argmax = the true label
            state, m = step(state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), target)
            bar.update()
    return nnx.merge(pol_graphdef, state.policy_params, state.policy_rest)


def policy_allocations(
    policy_net: nnx.Module, images: ArrayLike, budget: policy.Budget, *, chunk: int = 512
) -> np.ndarray:
    """The deployed (greedy) allocation of a policy network for each input.

    Returns:
      int32 numpy ``[B, L]`` bit-widths.
    """
    graphdef, state = nnx.split(policy_net)

    @jax.jit
    def alloc(state, x):
        idx = greedy_allocation(graphdef, state, images=x, budget=budget)
        return policy.to_bits(idx, budget)

    images = np.asarray(images, np.float32)
    return np.concatenate(
        [
            np.asarray(alloc(state, jnp.asarray(images[i : i + chunk])))
            for i in range(0, len(images), chunk)
        ]
    )
