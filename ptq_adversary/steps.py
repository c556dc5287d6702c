"""Step builders: where models, losses, quantizers and optimizers meet.

Each ``make_*`` takes already-built pieces (a model's graphdef, an optax optimizer) and the few
scalars it needs, and returns a pure function of arrays that the trainer jits. No config, no
I/O. Steps return flat dicts of scalar (or ``[P]``) arrays; the caller reduces and logs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.typing import ArrayLike

from ptq_adversary import backend, losses, policy, policy_net
from ptq_adversary.models import apply_model

__all__ = [
    "TrainState",
    "create_train_state",
    "make_supervised_train_step",
    "make_distill_train_step",
    "make_eval_step",
    "uniform_bits",
    "PairState",
    "create_pair_state",
    "sample_allocations",
    "make_pair_train_step",
    "make_pair_eval_step",
    "MODES",
    "REWARDS",
    "map_policies",
]


@struct.dataclass
class TrainState:
    """Everything a supervised run needs to continue exactly; a pytree of arrays.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's ``nnx.Param`` state.
      rest: the model's other state (BatchNorm statistics).
      opt_state: the optax optimizer state.
      rng: uint32 ``[2]`` base key; steps derive theirs with ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def create_train_state(
    params: nnx.State, rest: nnx.State, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """The initial state: step 0, fresh optimizer state, base key from ``seed``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def make_supervised_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A full-precision cross-entropy training step (BatchNorm in training mode).

    Args:
      graphdef: the model's graph definition (from ``split_model``).
      optimizer: an optax optimizer.
      label_smoothing: in ``[0, 1)``; 0 is plain cross-entropy.

    Returns:
      ``step(state, images [B,H,W,C] float32, labels [B] int32) -> (state, metrics)`` with
      batch-mean ``loss`` and ``accuracy`` and the global ``grad_norm``.
    """

    def loss_fn(params, rest, images, labels):
        logits, new_rest = apply_model(graphdef, params, rest, images, train=True)
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, new_rest)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_rest)), grads = grad_fn(state.params, state.rest, images, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, rest=new_rest, opt_state=opt_state
        )
        return new_state, metrics

    return step


def make_distill_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    temperature: float,
    label_weight: float = 0.0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A stage-A knowledge-distillation step from cached teacher logits (full precision).

    Loss: ``mean_b kd_loss(f(x_b), T_b; tau) + label_weight * mean_b CE(f(x_b), y_b)``.

    Args:
      graphdef: the student's graph definition.
      optimizer: an optax optimizer.
      temperature: KD temperature ``tau``.
      label_weight: weight of the optional cross-entropy term on the labels (0: black-box KD
        from the teacher's outputs only).

    Returns:
      ``step(state, images [B,H,W,C], labels [B], teacher_logits [B,C]) -> (state, metrics)``
      with ``loss``, ``kd_loss``, ``accuracy`` (vs labels), ``teacher_agreement`` and
      ``grad_norm``.
    """

    def loss_fn(params, rest, images, labels, teacher_logits):
        logits, new_rest = apply_model(graphdef, params, rest, images, train=True)
        kd = losses.kd_loss(logits, teacher_logits, temperature=temperature).mean()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return kd + label_weight * ce, (logits, new_rest, kd)

    def step(state: TrainState, images, labels, teacher_logits):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_rest, kd)), grads = grad_fn(
            state.params, state.rest, images, labels, teacher_logits
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        predictions = jnp.argmax(logits, -1)
        metrics = {
            "loss": loss,
            "kd_loss": kd,
            "accuracy": jnp.mean(predictions == labels),
            "teacher_agreement": jnp.mean(predictions == jnp.argmax(teacher_logits, -1)),
            "grad_norm": optax.tree.norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            rest=new_rest,
            opt_state=opt_state,
        )
        return new_state, metrics

    return step


# ------------------------------------------------------------------- many policies at once
def map_policies(
    fn: Callable[[jax.Array], Any],
    bits_pbl: ArrayLike,
    *,
    chunk: int | None = None,
    unroll: bool = False,
) -> Any:
    """``jax.vmap(fn)(bits_pbl)``, computed in chunks of ``chunk`` policies.

    ``fn`` maps one allocation ``bits_bl [B, L]`` to a pytree of arrays; everything else it
    needs (weights, images) is closed over and shared by all policies, and whatever does not
    depend on the bits (e.g. the first layer, whose input is the image) is computed once. With
    ``chunk >= P`` this is one ``jax.vmap`` (the P policies folded into the batch). Otherwise
    it is a ``jax.lax.map(fn, bits_pbl, batch_size=chunk)``: a loop over ``P // chunk``
    vmapped chunks plus one vmapped remainder, so each call keeps a cache-friendly size and
    memory stays flat in ``P``; or, with ``unroll``, the same chunks as a Python loop (one copy
    of ``fn`` per chunk in the program).

    Use ``unroll=True`` where the result is differentiated: XLA:CPU (jax 0.10) leaves the
    weight-gradient convolutions of a loop body in a non-canonical layout, and the backward pass
    of the looped policies ran 6-11x slower than one vmap (experiments/bench_torch.py profile).
    Forward-only evaluation keeps the loop, whose program size and compile time do not grow
    with P.

    Args:
      fn: ``bits_bl int [B, L] -> pytree``, traceable.
      bits_pbl: int ``[P, B, L]`` (any leading axis ``P``, including 0).
      chunk: policies per vmapped call; ``None`` picks :func:`backend.policy_chunk` for the
        current backend.
      unroll: chunks as a Python loop instead of a ``lax.map``.

    Returns:
      ``fn``'s pytree with a leading ``[P]`` axis on every leaf; equal to the full vmap up to
      float rounding of differently sized convolutions (tests/test_steps.py).
    """
    bits_pbl = jnp.asarray(bits_pbl)
    num_policies = bits_pbl.shape[0]
    if chunk is None:
        chunk = backend.policy_chunk(num_policies, bits_pbl.shape[1] if bits_pbl.ndim > 1 else 1)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if chunk >= num_policies:
        return jax.vmap(fn)(bits_pbl)
    if not unroll:
        return jax.lax.map(fn, bits_pbl, batch_size=chunk)
    parts = [jax.vmap(fn)(bits_pbl[i : i + chunk]) for i in range(0, num_policies, chunk)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def uniform_bits(choices: Sequence[int], batch: int, num_sites: int) -> jax.Array:
    """Allocations that put every site at the same bit-width.

    Args:
      choices: P bit-widths.
      batch: B.
      num_sites: L.

    Returns:
      int32 ``[P, B, L]`` with ``out[p] == choices[p]`` everywhere.
    """
    values = jnp.asarray(choices, jnp.int32)[:, None, None]
    return jnp.broadcast_to(values, (len(choices), batch, num_sites))


def make_eval_step(
    graphdef: nnx.GraphDef, *, chunk: int | None = None, branches: int | None = None
) -> Callable[..., dict[str, jax.Array]]:
    """An evaluation step: full precision and P bit allocations in one call, masked sums.

    The P quantized forward passes run over the policy axis of ``bits`` with shared weights
    (:func:`map_policies`: vmapped, in chunks of ``chunk`` policies), so one compile serves
    every allocation of the same shape.

    Args:
      graphdef: the model's graph definition.
      chunk: policies per vmapped call (``None``: :func:`backend.policy_chunk` for the backend).
      branches: batch branches of each quantized pass (``None``: the backend's default,
        :func:`backend.inference_branches`; see :func:`models.apply_model`).

    Returns:
      ``step(params, rest, images [B,H,W,C], labels [B], mask [B], bits [P,B,L] int) ->
      metrics`` with masked sums: ``count``, ``fp_correct``, ``fp_loss`` (scalars) and
      ``q_correct``, ``q_loss`` (``[P]``). ``P`` may be 0.
    """

    def masked_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array):
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(correct * mask), jnp.sum(loss * mask)

    def step(
        params, rest, images: ArrayLike, labels: ArrayLike, mask: ArrayLike, bits: ArrayLike
    ) -> dict[str, Any]:
        fp_logits, _ = apply_model(graphdef, params, rest, images)
        fp_correct, fp_loss = masked_sums(fp_logits, labels, mask)

        def quantized(bits_bl):
            q_logits, _ = apply_model(graphdef, params, rest, images, bits_bl, branches=branches)
            return masked_sums(q_logits, labels, mask)

        q_correct, q_loss = map_policies(quantized, bits, chunk=chunk)
        return {
            "count": jnp.sum(mask),
            "fp_correct": fp_correct,
            "fp_loss": fp_loss,
            "q_correct": q_correct,
            "q_loss": q_loss,
        }

    return step


# ------------------------------------------------------------------------- stage B: pairs
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
        greedy_idx = policy_net.greedy_allocation(  # [B, L]
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
