r"""Audit any trained model: how badly can dynamic PTQ at a bit budget hurt it, and where?

The network is frozen. For a model, images, labels and a budget (choices, mean bits per site),
the audit evaluates budget-feasible per-example bit allocations found by several methods:

``uniform``
  the one allocation a static deployment would use (:func:`policy.uniform_allocation`).
``random``
  allocations drawn uniformly from all feasible ones: the accuracy under one random draw, and
  *random search* (the worst of ``E`` draws per example) as the baseline every search must beat.
``greedy`` / ``beam``
  per-example local search maximising the quantized cross-entropy: from the uniform
  allocation, repeatedly move bits between two sites (exact sum kept) and keep the ``W`` best
  allocations (``W = 1`` greedy). Works for any number of sites.
``policy``
  the pipeline's input-conditioned policy (:class:`~ptq_adversary.policy.PolicyNet`)
  trained by REINFORCE against the frozen network (:func:`train_policy`): the damage a
  *deployable* policy (a function of the input) achieves, as opposed to a per-example oracle.
``certify``
  branch and bound over the allocations (:func:`certify`): per example a proof that no
  feasible allocation misclassifies it (sound interval bounds through the rest of the program
  prune whole subtrees), or a misclassifying allocation (the other methods' finds are tried
  first), or, past its node or time limit, neither. Its ``certified_accuracy`` is a
  lower bound of the worst-case accuracy and its ``accuracy`` an upper one: the bracket, exact
  when they meet. Works at any number of sites; it only gets slower.
``exhaustive``
  every feasible allocation for every example when there are at most ``max_allocations``: the
  exact per-example worst case (the oracle), prefix-shared (:func:`exhaustive`): allocations
  that share a prefix of site bits share the computation up to that prefix.

Entry point: :func:`audit` returns an :class:`AuditResult`; :func:`write_report` writes it as
JSON, CSV, a markdown summary and PNG plots. ``configs/audit.py`` runs it from the command line
on a checkpoint of a pipeline workdir.

Submodules (each method's code lives with it; the registry calls it):

``core``
  :func:`audit`: checks, the full-precision pass, the methods in order, the combined result.
``registry``
  ``REGISTRY``: method name -> ``method(ctx, found) -> MethodOutcome`` (``AuditContext``: the
  model, inputs, budget and options), in the order of :data:`METHODS`; the enumeration the
  methods share.
``evaluate``
  the FP and quantized forward passes, input checks, :func:`evaluate_allocations`.
``enumeration``
  :func:`exhaustive` over the prefix tree of allocations (:func:`prefix_tree`, segments, plan).
``search``
  :func:`random_search`, :func:`beam_search` (greedy: width 1), :class:`SearchResult`.
``attack``
  the learned attack policy: :class:`PolicyConfig`, :func:`train_policy`,
  :func:`policy_allocations`.
``branch_and_bound``, ``nodes``, ``certificates``
  :func:`certify`; its batched node steps, budget tables and search record; what it returns
  (:class:`CertifyResult`, :data:`STATES`, :func:`default_candidates`).
``results``
  :class:`MethodResult`, :class:`AuditResult`, :func:`example_status` (:data:`STATUSES`).
``report``, ``plots``
  :func:`write_report` (JSON, CSV, markdown) and its PNG figures.
"""

from ptq_adversary.audit.attack import PolicyConfig, policy_allocations, train_policy
from ptq_adversary.audit.branch_and_bound import certify
from ptq_adversary.audit.certificates import STATES, CertifyResult, default_candidates
from ptq_adversary.audit.core import audit
from ptq_adversary.audit.enumeration import PrefixLevel, exhaustive, prefix_tree
from ptq_adversary.audit.evaluate import evaluate_allocations
from ptq_adversary.audit.registry import METHODS
from ptq_adversary.audit.report import write_report
from ptq_adversary.audit.results import STATUSES, AuditResult, MethodResult, example_status
from ptq_adversary.audit.search import SearchResult, beam_search, random_search
from ptq_adversary.policy import low_bit_starts

__all__ = [
    "METHODS",
    "STATES",
    "STATUSES",
    "AuditResult",
    "CertifyResult",
    "MethodResult",
    "PolicyConfig",
    "PrefixLevel",
    "SearchResult",
    "audit",
    "beam_search",
    "certify",
    "default_candidates",
    "evaluate_allocations",
    "example_status",
    "exhaustive",
    "low_bit_starts",
    "policy_allocations",
    "prefix_tree",
    "random_search",
    "train_policy",
    "write_report",
]
