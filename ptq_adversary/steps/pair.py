"""Stage B: a network and its bit-width policy trained as a pair, and their evaluation.

:func:`make_pair_train_step` updates the network with the quantizer in the loop (allocations
sampled from the policy, :func:`sample_allocations`) and then the policy by REINFORCE with
rewards from the same quantized passes; :func:`make_pair_eval_step` scores the policy's greedy
allocation against the uniform and random feasible ones. :class:`PairState` is the pytree the
train step carries; :data:`MODES` and :data:`REWARDS` are the allowed ``mode`` / ``reward``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ptq_adversary import backend, losses, policy
from ptq_adversary.models import apply_model
from ptq_adversary.steps.policies import map_policies

__all__ = [
    "MODES",
    "REWARDS",
    "PairState",
    "create_pair_state",
    "make_pair_eval_step",
    "make_pair_train_step",
    "sample_allocations",
]

MODES = ("robust", "detrimental")
REWARDS = ("kl", "ce")


@struct.dataclass
class PairState:
    """State of policy-aware training (stage B); a pytree of arrays.

    Attributes:
      step: int32 scalar.
      params, rest: the network's parameters and (frozen) BatchNorm statistics.
      opt_state: the network optimizer's state.
      policy_params, policy_rest: the policy network's parameters and other state.
      policy_opt_state: the policy optimizer's state.
      rng: uint32 ``[2]`` base key; step ``s`` samples with ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    policy_params: nnx.State
    policy_rest: nnx.State
    policy_opt_state: optax.OptState
    rng: jax.Array


def create_pair_state(
    params: nnx.State,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    policy_params: nnx.State,
    policy_rest: nnx.State,
    policy_optimizer: optax.GradientTransformation,
    seed: int,
) -> PairState:
    """The initial stage-B state: step 0, fresh optimizer states, base key from ``seed``."""
    return PairState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        policy_params=policy_params,
        policy_rest=policy_rest,
        policy_opt_state=policy_optimizer.init(policy_params),
        rng=jax.random.PRNGKey(seed),
    )


def _policy_forward(policy_graphdef: nnx.GraphDef, policy_params, policy_rest, images):
    return nnx.merge(policy_graphdef, policy_params, policy_rest)(images)


def sample_allocations(
    key: jax.Array, policy_logits_blk: jax.Array, budget: policy.Budget, num_samples: int
) -> jax.Array:
    """``P`` budget-feasible allocations per input from the policy.

    Args:
      key: a PRNG key.
      policy_logits_blk: float ``[B, L, K]``.
      budget: the static budget.
      num_samples: ``P``.

    Returns:
      int32 ``bit_idx [P, B, L]``.
    """
    batch = policy_logits_blk.shape[0]
    keys = jax.random.split(key, num_samples * batch).reshape(num_samples, batch, -1)
    sample_one = lambda k, logits: policy.sample(k, logits, budget)
    return jax.vmap(jax.vmap(sample_one, in_axes=(0, 0)), in_axes=(0, None))(
        keys, policy_logits_blk
    )


def make_pair_train_step(
    graphdef: nnx.GraphDef,
    policy_graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    policy_optimizer: optax.GradientTransformation,
    budget: policy.Budget,
    *,
    mode: str,
    num_samples: int,
    temperature: float,
    quant_weight: float,
    margin: float,
    reward: str,
    entropy_coef: float,
    quant_batch: int | None = None,
    chunk: int | None = None,
) -> Callable[..., tuple[PairState, dict[str, jax.Array]]]:
    """One stage-B step: a network update with the quantizer in the loop, then a policy update.

    Per input, ``P = num_samples`` allocations are sampled from the policy (exact budget) and
    the ``P`` quantized forward passes run vmapped over the policy axis with shared weights
    (:func:`map_policies`, in chunks of ``chunk`` policies). Network loss (BatchNorm frozen,
    STE through the quantizers)::

        robust:      KD(T, f_fp) + quant_weight * mean_p KD(sg(f_fp), f_q(x; b_p))
        detrimental: KD(T, f_fp) + quant_weight * mean_p (CE(f_q(x; b_p), y_T) - margin)^2

    Policy loss: REINFORCE with a leave-one-out baseline and an entropy bonus, with rewards
    from the same quantized passes (the network before this step's update): the divergence
    ``KL(f_fp || f_q)`` (``reward='kl'``) or ``CE(f_q, y_T)`` (``'ce'``), positive for the
    detrimental mode and negated for the robust one.

    Args:
      graphdef, policy_graphdef: graph definitions of the network and the policy.
      optimizer, policy_optimizer: their optax optimizers.
      budget: the static bit budget (choices, L, mean bits).
      mode: ``'robust'`` or ``'detrimental'``.
      num_samples: ``P >= 2`` allocations per input.
      temperature: KD temperature ``tau``.
      quant_weight: ``lambda``, weight of the quantized term.
      margin: ``m`` of the detrimental margin loss.
      reward: ``'kl'`` or ``'ce'``.
      entropy_coef: weight of the policy's entropy bonus.
      quant_batch: run the quantized passes (and the policy update) on the first
        ``quant_batch`` inputs of the batch only (``None``: all); bounds the cost ``P x B``.
      chunk: policies per vmapped quantized pass, as unrolled chunks (``None``:
        ``backend.policy_chunk(P, quant_batch, differentiated=True)``, one vmap off CPU). The values
        and gradients do not depend on it beyond float rounding.

    Returns:
      ``step(state, images [B,H,W,C], labels [B], teacher_logits [B,C]) -> (state, metrics)``.

    References:
      Frank & Ardis, arXiv 2510.02457 (2025); Hong et al., "Qu-ANTI-zation", NeurIPS 2021;
      Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (leave-one-out baseline), got {num_samples}")
    sign = 1.0 if mode == "detrimental" else -1.0

    def net_loss(params, rest, images, teacher_logits, bits_pbl, qb):
        fp_logits, _ = apply_model(graphdef, params, rest, images, train=True, frozen_bn=True)
        kd_fp = losses.kd_loss(fp_logits, teacher_logits, temperature=temperature).mean()
        q_images = images[:qb]

        def quantized(bits_bl):
            return apply_model(
                graphdef, params, rest, q_images, bits_bl, train=True, frozen_bn=True
            )[0]

        pass_chunk = (
            backend.policy_chunk(num_samples, qb, differentiated=True) if chunk is None else chunk
        )
        q_logits = map_policies(quantized, bits_pbl, chunk=pass_chunk, unroll=True)  # [P, Bq, C]
        if mode == "robust":
            target = jax.lax.stop_gradient(fp_logits[:qb])
            q_term = losses.kd_loss(q_logits, target, temperature=temperature).mean()
        else:
            y_teacher = jnp.broadcast_to(jnp.argmax(teacher_logits[:qb], -1), q_logits.shape[:2])
            q_term = losses.margin_loss(q_logits, y_teacher, margin=margin).mean()
        return kd_fp + quant_weight * q_term, (fp_logits, q_logits, kd_fp, q_term)

    def step(state: PairState, images, labels, teacher_logits):
        qb = images.shape[0] if quant_batch is None else min(quant_batch, images.shape[0])
        key = jax.random.fold_in(state.rng, state.step)
        q_images = images[:qb]

        # Policy forward once; its VJP later turns the REINFORCE gradient w.r.t. the logits
        # into parameter gradients without a second forward pass.
        policy_logits, policy_vjp = jax.vjp(
            lambda p: _policy_forward(policy_graphdef, p, state.policy_rest, q_images),
            state.policy_params,
        )
        bit_idx = sample_allocations(key, jax.lax.stop_gradient(policy_logits), budget,
                                     num_samples)  # fmt: skip
        bits = policy.to_bits(bit_idx, budget)  # [P, Bq, L]

        # (i) network update.
        grad_fn = jax.value_and_grad(net_loss, has_aux=True)
        (loss, (fp_logits, q_logits, kd_fp, q_term)), grads = grad_fn(
            state.params, state.rest, images, teacher_logits, bits, qb
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # (ii) policy update, rewards from the same quantized passes.
        q_logits = jax.lax.stop_gradient(q_logits)
        if reward == "kl":
            damage = losses.kl_divergence_logits(jax.lax.stop_gradient(fp_logits[:qb]), q_logits)
        else:
            y_teacher = jnp.broadcast_to(jnp.argmax(teacher_logits[:qb], -1), q_logits.shape[:2])
            damage = optax.softmax_cross_entropy_with_integer_labels(q_logits, y_teacher)
        rewards_pb = sign * damage  # [P, Bq]

        def policy_loss(logits_blk):
            per_path = jax.vmap(jax.vmap(lambda lg, idx: (
                policy.log_prob(lg, idx, budget), policy.entropy(lg, idx, budget)
            )), in_axes=(None, 0))  # fmt: skip
            log_probs, entropies = per_path(logits_blk, bit_idx)  # [P, Bq] each
            per_input = jax.vmap(
                lambda lp, r, e: losses.reinforce_loss(lp, r, e, entropy_coef=entropy_coef)[0],
                in_axes=(1, 1, 1),
            )(log_probs, rewards_pb, entropies)
            return per_input.mean(), entropies.mean()

        (pol_loss, entropy), logit_grads = jax.value_and_grad(policy_loss, has_aux=True)(
            policy_logits
        )
        (policy_grads,) = policy_vjp(logit_grads)
        policy_updates, policy_opt_state = policy_optimizer.update(
            policy_grads, state.policy_opt_state, state.policy_params
        )
        policy_params = optax.apply_updates(state.policy_params, policy_updates)

        y = labels[:qb]
        metrics = {
            "loss": loss,
            "kd_fp": kd_fp,
            "q_term": q_term,
            "fp_accuracy": jnp.mean(jnp.argmax(fp_logits, -1) == labels),
            "q_accuracy": jnp.mean(jnp.argmax(q_logits, -1) == y[None, :]),
            "damage": jnp.mean(damage),
            "policy_loss": pol_loss,
            "policy_entropy": entropy,
            "mean_bits": jnp.mean(bits.astype(jnp.float32)),
            "grad_norm": optax.tree.norm(grads),
            "policy_grad_norm": optax.tree.norm(policy_grads),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            policy_params=policy_params,
            policy_opt_state=policy_opt_state,
        )
        return new_state, metrics

    return step


def make_pair_eval_step(
    graphdef: nnx.GraphDef,
    policy_graphdef: nnx.GraphDef,
    budget: policy.Budget,
    *,
    num_random: int,
    chunk: int | None = None,
    branches: int | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """Evaluates a network/policy pair and its reference allocations in one pass.

    Allocations evaluated per input: the policy's greedy one (deployment), the uniform
    allocation at the budget (:func:`policy.uniform_allocation`) and ``num_random`` allocations
    drawn uniformly from all feasible ones. All quantized passes run in one call over the
    allocation axis (:func:`map_policies`, in chunks of ``chunk`` allocations; ``None``: the
    backend's default), each pass in ``branches`` batch branches (``None``: the backend's
    default, :func:`backend.inference_branches`).

    Returns:
      ``step(params, rest, policy_params, policy_rest, images [B,H,W,C], labels [B],
      mask [B], key) -> metrics`` with masked sums: ``count``, ``fp_correct``,
      ``greedy_correct``, ``uniform_correct``, ``random_correct`` (summed over the random
      draws), ``greedy_flips`` (FP right, greedy DPTQ wrong), ``greedy_bits`` (sum over inputs
      of the mean bits), and ``greedy_hist`` int ``[L, K]`` (how often each site got each
      choice).
    """
    uniform_idx = jnp.asarray(policy.uniform_allocation(budget), jnp.int32)

    def step(params, rest, policy_params, policy_rest, images, labels, mask, key):
        batch = images.shape[0]
        fp_logits, _ = apply_model(graphdef, params, rest, images)
        greedy_idx = policy.greedy_allocation(  # [B, L]
            policy_graphdef, policy_params, policy_rest, images=images, budget=budget
        )
        keys = jax.random.split(key, num_random * batch).reshape(num_random, batch, -1)
        random_idx = jax.vmap(jax.vmap(lambda k: policy.sample_uniform(k, budget)))(keys)
        allocations = jnp.concatenate(
            [
                greedy_idx[None],
                jnp.broadcast_to(uniform_idx, (1, batch, budget.num_sites)),
                random_idx,
            ]
        )  # [2 + R, B, L]
        bits = policy.to_bits(allocations, budget)
        q_logits = map_policies(
            lambda b: apply_model(graphdef, params, rest, images, b, branches=branches)[0],
            bits,
            chunk=chunk,
        )
        fp_right = (jnp.argmax(fp_logits, -1) == labels).astype(jnp.float32)
        q_right = (jnp.argmax(q_logits, -1) == labels[None]).astype(jnp.float32)  # [A, B]
        greedy_bits = policy.to_bits(greedy_idx, budget).astype(jnp.float32).mean(-1)
        one_hot = jax.nn.one_hot(greedy_idx, budget.num_choices, dtype=jnp.int32)
        return {
            "count": jnp.sum(mask),
            "fp_correct": jnp.sum(fp_right * mask),
            "greedy_correct": jnp.sum(q_right[0] * mask),
            "uniform_correct": jnp.sum(q_right[1] * mask),
            "random_correct": jnp.sum(q_right[2:] * mask),
            "greedy_flips": jnp.sum(fp_right * (1 - q_right[0]) * mask),
            "greedy_bits": jnp.sum(greedy_bits * mask),
            "greedy_hist": jnp.sum(one_hot * mask.astype(jnp.int32)[:, None, None], axis=0),
        }

    return step
