"""The audit's entry point: :func:`audit` checks its inputs, evaluates the model in full
precision, runs the requested methods of the registry (:mod:`ptq_adversary.audit.registry`) in
their order, and combines their outcomes into an :class:`~ptq_adversary.audit.AuditResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ptq_adversary import policy
from ptq_adversary.audit import evaluate
from ptq_adversary.audit.attack import PolicyConfig
from ptq_adversary.audit.registry import METHODS, REGISTRY, AuditContext, Enumeration
from ptq_adversary.audit.results import STRENGTH, AuditResult, MethodResult
from ptq_adversary.models import check_program, split_model
from ptq_adversary.policy import low_bit_starts

__all__ = ["audit"]


def audit(
    model: Any,
    images: ArrayLike,
    labels: ArrayLike,
    *,
    params: Any = None,
    weight_bits: int | None = 8,
    quantize_first: bool = False,
    choices: Sequence[int],
    budget: float,
    methods: Sequence[str] = METHODS,
    max_allocations: int = 5000,
    beam_width: int = 4,
    num_moves: int = 8,
    num_iters: int = 4,
    num_init: int = 0,
    low_starts: bool = True,
    num_random: int | None = None,
    policy_config: PolicyConfig = PolicyConfig(),  # noqa: B008 (frozen: immutable)
    train_images: ArrayLike | None = None,
    train_labels: ArrayLike | None = None,
    seed: int = 0,
    example_chunk: int = 128,
    certify_node_limit: int | None = None,
    certify_time_limit: float | None = None,
    certify_bounds: bool | str = "auto",
    progress: bool = True,
) -> AuditResult:
    """Audits a frozen model's worst case under dynamic PTQ at a bit budget.

    Args:
      model: the network, with no quantization code in it: any ``nnx.Module`` in inference
        use (``net(x) -> logits``; BatchNorm is switched to running statistics with
        ``.eval()``), a function ``fn(params, x) -> logits`` given with ``params`` (e.g. a
        ``flax.linen`` ``module.apply`` with ``params=variables``), or a
        :class:`~ptq_adversary.models.QuantizedModel`. Its quantization sites are derived from
        its program (:mod:`ptq_adversary.transform`).
      images: float ``[B, H, W, C]``, normalized as the model expects; labels: int ``[B]``.
      params: the parameters of a function ``model``.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      quantize_first: also quantize the input of the layer that reads the image.
      choices: the activation bit-width choices (sorted, unique, in [2, 16]).
      budget: mean bits per site; every allocation meets it exactly.
      methods: a subset of :data:`~ptq_adversary.audit.METHODS`.
      max_allocations: run ``exhaustive`` only if there are at most this many feasible
        allocations (else it is listed in ``skipped``). Also the limit below which a search is
        replaced by enumeration: a ``random``, ``greedy`` or ``beam`` search whose evaluations
        per example (``num_random``, or ``1 + num_init + S + num_iters * beam_width *
        num_moves``) reach the number of feasible allocations ``N <= max_allocations`` runs
        as the exact enumeration instead, computed once and shared: its result is the exact
        worst case with ``evaluations = N`` (for ``random``, the exact accuracy under one
        random allocation) and its time the enumeration's, and ``AuditResult.notes`` says so
        per method (e.g. ``"greedy": "22 feasible allocations <= 132 evaluations: exact
        enumeration used"``).
      beam_width, num_moves, num_iters: the beam search (``greedy`` uses width 1 with the same
        number of evaluations per example: ``num_moves * beam_width`` moves per iteration).
      num_init: random feasible allocations that seed greedy and beam search (random restarts;
        added to their evaluation count).
      low_starts: also seed greedy and beam search with :func:`low_bit_starts` (``L`` more
        evaluations per example, at most). On the default student at equal cost this made
        greedy search beat random search from 9 evaluations per example up, where without it
        random search did more damage below 33 (experiments/results/audit_search).
      num_random: draws per example for random search; default: the beam's evaluation count,
        so that the two compare at equal cost.
      policy_config: the ``policy`` method's REINFORCE training
        (:class:`~ptq_adversary.audit.PolicyConfig`).
      train_images, train_labels: data the policy is trained on (default: the audited images,
        which makes ``policy`` an optimistic, in-sample estimate).
      seed: seeds every random choice.
      example_chunk: examples per compiled call.
      certify_node_limit, certify_time_limit, certify_bounds: ``certify``'s ``node_limit``
        (nodes per example), ``time_limit`` (seconds) and ``bounds``
        (:func:`~ptq_adversary.audit.certify`). Its candidate leaves are the allocations the
        methods run before it found per example, then the uniform and low-bit allocations.
      progress: show progress bars.

    Returns:
      An :class:`~ptq_adversary.audit.AuditResult`.

    Raises:
      ValueError: bad images or labels (shape, dtype, non-finite values), unknown methods, a
        model that rejects the images; :class:`transform.TransformError` (a ValueError) for a
        program without sites, with a site in a loop, that mixes examples, or whose output
        ignores the bits; TypeError for a function without ``params``;
        :class:`policy.InfeasibleBudgetError` for an infeasible budget.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    model = evaluate.audited_model(model, images, params, weight_bits, quantize_first)
    images, labels = evaluate.check_inputs(images, labels)
    num_classes = evaluate.infer_num_classes(model, images)  # ValueError: rejected images
    evaluate.check_labels(labels, num_classes)
    qfn = check_program(model, images)  # TransformError: no site, mixed examples, dead bits
    num_sites, site_names = qfn.num_sites, qfn.site_names
    bud = policy.Budget(tuple(int(c) for c in choices), num_sites, float(budget))
    graphdef, params, rest = split_model(model)

    fp = [
        evaluate.fp_eval(
            graphdef,
            params,
            rest,
            jnp.asarray(images[i : i + 512]),
            jnp.asarray(labels[i : i + 512]),
        )
        for i in range(0, len(images), 512)
    ]
    fp_loss, fp_correct, fp_margin = (
        np.concatenate([np.asarray(f[k]) for f in fp]) for k in range(3)
    )
    fp_correct = fp_correct.astype(bool)
    num_starts = len(low_bit_starts(bud)) if low_starts else 0
    ctx = AuditContext(
        model=model,
        images=images,
        labels=labels,
        budget=bud,
        fp_correct=fp_correct,
        fp_loss=fp_loss,
        search_evals=1 + num_init + num_starts + num_iters * beam_width * num_moves,
        # A search at least as costly as enumerating every allocation runs as the enumeration.
        exact=Enumeration(model, images, labels, bud, max_allocations, example_chunk),
        max_allocations=max_allocations,
        beam_width=beam_width,
        num_moves=num_moves,
        num_iters=num_iters,
        num_init=num_init,
        low_starts=low_starts,
        num_random=num_random,
        policy_config=policy_config,
        train_images=train_images,
        train_labels=train_labels,
        seed=seed,
        example_chunk=example_chunk,
        certify_node_limit=certify_node_limit,
        certify_time_limit=certify_time_limit,
        certify_bounds=certify_bounds,
        progress=progress,
    )
    results: dict[str, MethodResult] = {}
    skipped: dict[str, str] = {}
    random_accuracy = None
    worst_static = None
    min_low = np.full(len(labels), -1, np.int64)
    for name in [m for m in METHODS if m in methods]:
        out = REGISTRY[name](ctx, results)
        results.update(out.results)
        if out.skipped is not None:
            skipped[name] = out.skipped
        if out.random_accuracy is not None:
            random_accuracy = out.random_accuracy
        if out.worst_static is not None:
            worst_static = out.worst_static
        if out.min_low_bit_sites is not None:
            min_low = out.min_low_bit_sites

    vulnerable = np.any([m.broken for m in results.values()], axis=0)
    worst_loss = np.max([m.worst_loss for m in results.values()], axis=0)
    # Per example, the allocation from the strongest method that broke it (else the strongest
    # method's worst-loss allocation).
    by_strength = [results[k] for k in STRENGTH if k in results]
    breaking = by_strength[0].bits.copy()
    for m in reversed(by_strength):
        breaking = np.where(m.broken[:, None], m.bits, breaking)
    return AuditResult(
        site_names=site_names,
        choices=bud.choices,
        budget=bud.budget,
        num_allocations=ctx.exact.n,
        fp_accuracy=float(fp_correct.mean()),
        fp_correct=fp_correct,
        fp_loss=fp_loss,
        fp_margin=fp_margin,
        labels=labels,
        methods=results,
        random_accuracy=random_accuracy,
        vulnerable=vulnerable,
        loss_increase=(worst_loss - fp_loss).astype(np.float32),
        breaking_bits=breaking,
        min_low_bit_sites=min_low,
        worst_static=worst_static,
        skipped=skipped,
        notes=ctx.exact.notes,
    )
