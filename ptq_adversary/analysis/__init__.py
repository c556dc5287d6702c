"""Assessment of trained network/policy pairs: where and why DPTQ fails, and how surely.

Pure functions in four groups, and a loader that strings them together; every name below is
importable from ``ptq_adversary.analysis`` itself. Submodules:

* :mod:`~ptq_adversary.analysis.inference`: a pair of a pipeline workdir and its outputs
  (:func:`load_pair`, :func:`load_run_dataset`, :func:`pair_forward`, :func:`predict_pair`).
* :mod:`~ptq_adversary.analysis.transitory`: **transitory points** (:func:`transitory_points`,
  :func:`rank_bins`, :func:`binned_rates`, :func:`class_rates`, :func:`flip_concentration`,
  :func:`average_ranks`, :func:`transitory_summary`): per test input, the FP prediction, margin
  and confidence and whether the pair's greedy DPTQ allocation flips it, then flip rates per
  FP-margin decile and per class, and how much of the damage sits on low-margin inputs.
* :mod:`~ptq_adversary.analysis.layerwise`: **layer-wise** (:func:`bit_histogram`,
  :func:`class_mean_bits`, :func:`entropy_bits`, :func:`allocation_summary`,
  :func:`sensitivity_allocations`, :func:`allocation_accuracy`, :func:`site_sensitivity`):
  which bits each policy gives each site, how that depends on the input, and how much accuracy
  each site costs alone at low precision (budget ignored).
* :mod:`~ptq_adversary.analysis.assessment`: :func:`assess_pair` loads a pair of a pipeline
  workdir (``DIR/<mode>/best/``) and returns all of the per-pair analyses as plain dicts of
  floats, lists and numpy arrays (:data:`PREDICTION_PASSES` weighs its progress).
* :mod:`~ptq_adversary.analysis.shift`: **shift** (:func:`evaluate_corruptions`): FP and
  greedy-DPTQ accuracy of several pairs under every corruption of
  :mod:`ptq_adversary.corruptions` and severity.
* :mod:`~ptq_adversary.analysis.stats`: **statistics over seeds** (:func:`mean_ci`,
  :data:`HEADLINE`, :func:`headline_numbers`, :func:`aggregate_seeds`).

Forward passes go through the functional API (:func:`models.apply_model`,
:func:`policy.greedy_allocation`), jitted once per architecture and batch shape.
"""

from ptq_adversary.analysis.assessment import PREDICTION_PASSES, assess_pair
from ptq_adversary.analysis.inference import (
    load_pair,
    load_run_dataset,
    pair_forward,
    predict_pair,
)
from ptq_adversary.analysis.layerwise import (
    allocation_accuracy,
    allocation_summary,
    bit_histogram,
    class_mean_bits,
    entropy_bits,
    sensitivity_allocations,
    site_sensitivity,
)
from ptq_adversary.analysis.shift import evaluate_corruptions
from ptq_adversary.analysis.stats import HEADLINE, aggregate_seeds, headline_numbers, mean_ci
from ptq_adversary.analysis.transitory import (
    average_ranks,
    binned_rates,
    class_rates,
    flip_concentration,
    rank_bins,
    transitory_points,
    transitory_summary,
)

__all__ = [
    "load_pair",
    "load_run_dataset",
    "pair_forward",
    "predict_pair",
    "transitory_points",
    "rank_bins",
    "binned_rates",
    "class_rates",
    "flip_concentration",
    "average_ranks",
    "transitory_summary",
    "bit_histogram",
    "class_mean_bits",
    "entropy_bits",
    "allocation_summary",
    "sensitivity_allocations",
    "allocation_accuracy",
    "site_sensitivity",
    "PREDICTION_PASSES",
    "assess_pair",
    "evaluate_corruptions",
    "mean_ci",
    "HEADLINE",
    "headline_numbers",
    "aggregate_seeds",
]
