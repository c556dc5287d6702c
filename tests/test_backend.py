"""Tests for ptq_adversary.backend: the defaults derived from the tuning tables, as documented."""

import jax
import pytest

from ptq_adversary import backend

TABLES = ("INFERENCE_BRANCH_EXAMPLES", "POLICY_CHUNK_EXAMPLES", "GRAD_CHUNK_EXAMPLES",
          "ROW_CHUNK", "ROW_BRANCHES")  # fmt: skip


@pytest.mark.parametrize("name", TABLES)
def test_tables_map_backend_names_to_positive_sizes(name):
    table = getattr(backend, name)
    assert isinstance(table, dict) and table
    for key, value in table.items():
        assert key in ("cpu", "gpu", "tpu") and isinstance(value, int) and value >= 1


def test_none_means_the_default_backend():
    here = jax.default_backend()
    assert backend.inference_branches(512) == backend.inference_branches(512, here)
    assert backend.policy_chunk(64, 8) == backend.policy_chunk(64, 8, here)
    assert backend.default_row_chunk() == backend.default_row_chunk(here)
    assert backend.row_branches(5) == backend.row_branches(5, here)


def test_inference_branches_round_and_clip(monkeypatch):
    monkeypatch.setitem(backend.INFERENCE_BRANCH_EXAMPLES, "gpu", 16)
    monkeypatch.setattr(backend, "MAX_INFERENCE_BRANCHES", 100)
    monkeypatch.setattr(backend, "MIN_BRANCHED_BATCH", 128)
    assert backend.inference_branches(150, "gpu") == 9  # round(9.375)
    assert backend.inference_branches(154, "gpu") == 10  # round(9.625)
    assert backend.inference_branches(127, "gpu") == 1  # below MIN_BRANCHED_BATCH
    monkeypatch.setattr(backend, "MAX_INFERENCE_BRANCHES", 4)
    assert backend.inference_branches(10**6, "gpu") == 4
    monkeypatch.setitem(backend.INFERENCE_BRANCH_EXAMPLES, "gpu", 10**6)
    assert backend.inference_branches(128, "gpu") == 1  # round(0.000128) clipped up to 1
    monkeypatch.delitem(backend.INFERENCE_BRANCH_EXAMPLES, "gpu")
    assert backend.inference_branches(10**6, "gpu") == 1  # no entry: one branch


def test_policy_chunk_follows_a_tuned_table_and_stays_in_one_to_p(monkeypatch):
    monkeypatch.setitem(backend.POLICY_CHUNK_EXAMPLES, "gpu", 4096)
    monkeypatch.setitem(backend.GRAD_CHUNK_EXAMPLES, "gpu", 256)
    assert backend.policy_chunk(64, 128, "gpu") == 32
    assert backend.policy_chunk(64, 128, "gpu", differentiated=True) == 2
    assert backend.policy_chunk(8, 1, "gpu") == 8  # never more than P
    assert backend.policy_chunk(8, 10**6, "gpu") == 1  # at least one
    assert backend.policy_chunk(8, 0, "gpu") == 8  # an empty batch counts as one example
    assert backend.policy_chunk(0, 128, "gpu") == 1
    # No entry: one vmap.
    assert backend.policy_chunk(64, 128, "no-such-backend", differentiated=True) == 64


def test_row_defaults(monkeypatch):
    monkeypatch.setitem(backend.ROW_CHUNK, "gpu", 4)
    monkeypatch.setitem(backend.ROW_BRANCHES, "gpu", 8)
    assert backend.default_row_chunk("gpu") == 4
    assert backend.default_row_chunk("no-such-backend") == backend.DEFAULT_ROW_CHUNK
    assert [backend.row_branches(r, "gpu") for r in (0, 1, 3, 8, 100)] == [1, 1, 3, 8, 8]
    assert [backend.row_branches(r, "no-such-backend") for r in (0, 1, 100)] == [1, 1, 1]
