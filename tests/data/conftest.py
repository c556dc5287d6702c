"""Fixtures of the data tests."""

import pytest

from ptq_adversary import data
from tests.data.fakes import traceable_split


@pytest.fixture
def synthetic(monkeypatch):
    """Registers 'synthetic': 1000 traceable train examples and 300 test examples."""
    raw = data.RawDataset(
        train=traceable_split(1000), test=traceable_split(300), class_names=("a", "b", "c")
    )
    monkeypatch.setitem(data.DATASETS, "synthetic", lambda data_dir: raw)
    return raw
