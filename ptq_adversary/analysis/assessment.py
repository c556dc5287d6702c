"""One pair's assessment: the transitory-point and layer-wise analyses on its test split.

:func:`assess_pair` loads a pair of a pipeline workdir (``DIR/<mode>/best/``, see
:mod:`~ptq_adversary.analysis.inference`) and returns every per-pair analysis of
:mod:`~ptq_adversary.analysis.transitory` and :mod:`~ptq_adversary.analysis.layerwise` as plain
dicts of floats, lists and numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ptq_adversary import data, models, policy
from ptq_adversary.analysis import inference, layerwise, transitory

__all__ = ["PREDICTION_PASSES", "assess_pair"]

#: Network forward passes per input of the prediction (FP network, policy, DPTQ network), the
#: weight of the prediction against the ``1 + L * K`` passes of the sensitivity probe when
#: :func:`assess_pair` reports its progress.
PREDICTION_PASSES = 3


def assess_pair(
    run_dir: str,
    mode: str,
    *,
    dataset: data.Dataset | None = None,
    batch_size: int = 1000,
    num_bins: int = 10,
    sensitivity: bool = True,
    advance: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Transitory-point and layer-wise analyses of one pair on the test split.

    Args:
      run_dir: a pipeline workdir with ``<mode>/best/`` (and ``config.json`` unless
        ``dataset`` is given).
      mode: ``'robust'`` or ``'detrimental'``.
      dataset: the data (default: :func:`load_run_dataset`).
      batch_size: evaluation batch size.
      num_bins: margin/confidence bins (10: deciles).
      sensitivity: run the one-site-at-a-time probe (``1 + L * K`` passes over the test set).
      advance: progress, called after each batch with the fraction of the pair's work it
        did (the calls sum to 1; work counted in network passes, :data:`PREDICTION_PASSES`
        per input for the prediction and ``1 + L * K`` for the probe), e.g. a bar's
        ``update``.

    Returns:
      ``mode``, ``site_names``, ``choices``, ``class_names``, ``num_examples``,
      ``fp_accuracy``, ``dptq_accuracy``; ``per_input`` (numpy arrays: ``labels [N]``,
      ``bit_idx [N, L]``, ``bits [N, L]`` and the :func:`transitory_points` arrays);
      ``transitory`` (:func:`transitory_summary`); ``layerwise``: ``bit_histogram [L][K]``,
      ``class_mean_bits [C][L]``, ``site_mean_bits [L]``, ``allocation``
      (:func:`allocation_summary`) and ``sensitivity`` (:func:`site_sensitivity`, or None).
    """
    dataset = dataset if dataset is not None else inference.load_run_dataset(run_dir)
    model, pol = inference.load_pair(run_dir, mode)
    budget = pol.spec.budget_spec
    images = data.normalize(dataset.test.images, dataset.mean, dataset.std)
    labels = dataset.test.labels
    probe = 1 + model.num_sites * budget.num_choices if sensitivity else 0
    share = PREDICTION_PASSES / (PREDICTION_PASSES + probe)

    def scaled(weight: float) -> Callable[[float], None] | None:  # a stage's share of the work
        return None if advance is None else (lambda fraction: advance(weight * fraction))

    out = inference.predict_pair(model, pol, images, batch_size=batch_size, advance=scaled(share))
    points = {
        k: np.asarray(v)
        for k, v in transitory.transitory_points(out["fp_logits"], out["q_logits"], labels).items()
    }
    bits = np.asarray(policy.to_bits(out["bit_idx"], budget))
    sens = None
    if sensitivity:
        logits_fn = lambda x, b: models.apply_model(model.graphdef, model.params, model.rest, x, b)[
            0
        ]
        sens = layerwise.site_sensitivity(
            logits_fn,
            images,
            labels,
            budget.choices,
            model.num_sites,
            batch_size=batch_size,
            advance=scaled(1.0 - share),
        )
    return {
        "mode": mode,
        "site_names": list(model.site_names),
        "choices": list(budget.choices),
        "class_names": list(dataset.class_names),
        "num_examples": int(len(labels)),
        "fp_accuracy": float(points["fp_correct"].mean()),
        "dptq_accuracy": float(points["q_correct"].mean()),
        "per_input": {"labels": labels, "bit_idx": out["bit_idx"], "bits": bits, **points},
        "transitory": transitory.transitory_summary(points, labels, dataset.num_classes, num_bins),
        "layerwise": {
            "bit_histogram": layerwise.bit_histogram(out["bit_idx"], budget.num_choices).tolist(),
            "class_mean_bits": layerwise.class_mean_bits(
                bits, labels, dataset.num_classes
            ).tolist(),
            "site_mean_bits": bits.mean(0).tolist(),
            "allocation": layerwise.allocation_summary(out["bit_idx"], labels, budget.choices),
            "sensitivity": sens,
        },
    }
