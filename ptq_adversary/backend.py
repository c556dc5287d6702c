"""Every per-backend tuning table, and the defaults derived from them.

Each table maps ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``) to a size that a
benchmark chose; each entry names the benchmark that set it (``docs/PERFORMANCE.md`` has the
measurements). A backend without an entry gets the plain program: one vmap over policies, one
batch branch, every prefix row of an enumeration in one call. Only XLA:CPU has entries so far:
``experiments/accelerator_check.sh`` measures the numbers an accelerator entry needs.

The tables are plain module-level dicts, so a user can tune them in a notebook before the first
compile, e.g. ``backend.POLICY_CHUNK_EXAMPLES["gpu"] = 4096``.
"""

from __future__ import annotations

import jax

__all__ = [
    "GRAD_CHUNK_EXAMPLES",
    "INFERENCE_BRANCH_EXAMPLES",
    "MAX_INFERENCE_BRANCHES",
    "MIN_BRANCHED_BATCH",
    "POLICY_CHUNK_EXAMPLES",
    "ROW_BRANCHES",
    "ROW_CHUNK",
    "DEFAULT_ROW_CHUNK",
    "default_row_chunk",
    "inference_branches",
    "policy_chunk",
    "row_branches",
]

# ---------------------------------------------------------------- batch branches (models)
#: Examples per independent batch branch of a quantized inference pass, per backend. XLA:CPU
#: runs a quantized pass as a chain of small kernels, one after another, each over the whole
#: batch; cutting the batch into independent branches of ~16 examples lets the runtime overlap
#: one branch's quantizer with another's convolutions (default student at B = 128: 1.1-1.6x
#: faster than one branch, ``experiments/bench_policies.py``).
INFERENCE_BRANCH_EXAMPLES: dict[str, int] = {"cpu": 16}

#: Upper bound on the automatic branch count: the program holds one copy of the model per
#: branch, and compile time grows with it (eval step of the default student: ~3 s with one
#: branch, ~3.5 s with 4, ~7 s with 8, ~11 s with 16, measured once). In the runs of
#: ``experiments/bench_policies.py`` on 2026-11-30, 64-256 policies at B = 128 cost 0.70-1.00x
#: the limit (P FP passes) with 8 branches and 1.18-1.30x with 4.
MAX_INFERENCE_BRANCHES = 8

#: Smallest batch that is split automatically: below it a pass takes a few milliseconds, and
#: the extra compile time of the branch copies (seconds per program) outweighs the gain in
#: short jobs (the smoke configs and tests evaluate 64 examples or fewer).
MIN_BRANCHED_BATCH = 128

# ------------------------------------------------------------- policy chunks (steps)
#: Examples (policies x batch) per chunk that ``steps.map_policies`` aims for, per backend.
#: Measured with ``experiments/bench_policies.py`` and ``bench_scaling.py`` (2-core x86-64,
#: jax 0.10): on XLA:CPU the cost per example grows once a call holds more than a few hundred
#: examples of the default student (the activations leave the caches: one vmap of 64 policies
#: x 128 inputs took ~2x as long as chunks of 128-512 examples), so the policy axis runs over
#: chunks of about this many examples.
POLICY_CHUNK_EXAMPLES: dict[str, int] = {"cpu": 128}

#: The same for passes that are differentiated (stage B's network update). XLA:CPU's backward
#: convolutions lose even more per example with the batch (quantized forward+backward of the
#: default student: ~450 us/example at 32, ~700 at 256), so the stage-B step runs its P = 8
#: passes over 32 inputs as 8 unrolled chunks of 32: ~1.3x faster per step than one vmap, for
#: 6-8 s more compile time (``experiments/bench_torch.py`` times both).
GRAD_CHUNK_EXAMPLES: dict[str, int] = {"cpu": 32}

# ------------------------------------------------------- prefix enumeration (audit)
#: Prefix rows per call of an exhaustive enumeration's segment (``row_chunk``), per backend.
#: XLA:CPU runs a conv on B examples faster per example than on R x B
#: (``experiments/bench_enumeration.py``), so on CPU every prefix is its own call; other
#: backends take :data:`DEFAULT_ROW_CHUNK` rows at once (wide programs suit accelerators; not
#: measured here).
ROW_CHUNK: dict[str, int] = {"cpu": 1}
DEFAULT_ROW_CHUNK = 16

#: Prefixes per call as independent branches of one program (``row_chunk == 1``), per backend:
#: XLA:CPU overlaps their kernels. A call with several prefixes gives each its whole batch (no
#: batch branches); a lone prefix gets the usual batch branches. Default student, 109
#: allocations x 256 examples (``python experiments/bench_enumeration.py``, 2-core Xeon):
#: 2.35x faster than the per-allocation loop, bit-identical; 1.64x when every prefix of the
#: 8 also had 8 batch branches, and without joining the 1:1 head level to the last conv.
ROW_BRANCHES: dict[str, int] = {"cpu": 8}


def _backend(backend: str | None) -> str:
    return backend or jax.default_backend()


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
    target = INFERENCE_BRANCH_EXAMPLES.get(_backend(backend))
    if target is None or batch < MIN_BRANCHED_BATCH:
        return 1
    return max(1, min(MAX_INFERENCE_BRANCHES, round(batch / target)))


def policy_chunk(
    num_policies: int, batch: int, backend: str | None = None, *, differentiated: bool = False
) -> int:
    """The default chunk (policies per vmapped call) for ``P`` policies on a batch of ``B``.

    Args:
      num_policies: ``P``.
      batch: ``B``, examples per policy.
      backend: ``jax.default_backend()`` if None.
      differentiated: use :data:`GRAD_CHUNK_EXAMPLES` (passes inside a gradient) instead of
        :data:`POLICY_CHUNK_EXAMPLES`.

    Returns:
      An int in ``[1, max(P, 1)]``: ``P`` (one vmap) where the backend has no entry in the
      table, else ``table[backend] // B`` clipped.
    """
    table = GRAD_CHUNK_EXAMPLES if differentiated else POLICY_CHUNK_EXAMPLES
    target = table.get(_backend(backend))
    if target is None:
        return max(num_policies, 1)
    return max(1, min(num_policies, target // max(batch, 1)))


def default_row_chunk(backend: str | None = None) -> int:
    """Prefix rows per enumeration call: :data:`ROW_CHUNK`, else :data:`DEFAULT_ROW_CHUNK`."""
    return ROW_CHUNK.get(_backend(backend), DEFAULT_ROW_CHUNK)


def row_branches(rows: int, backend: str | None = None) -> int:
    """Prefixes per call as independent branches, in ``[1, rows]`` (1 without an entry)."""
    return max(1, min(ROW_BRANCHES.get(_backend(backend), 1), rows))
