"""Tests for ptq_adversary.data.idx: IDX parsing and its clear errors on damaged files."""

import numpy as np
import pytest

from ptq_adversary import data
from tests.data.fakes import idx_bytes, write_gz


def test_read_idx_roundtrip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_gz(tmp_path / "x.gz", idx_bytes(array))
    (tmp_path / "x").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x"), array)


def test_truncated_gzip_raises_clear_error(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    write_gz(tmp_path / "full.gz", idx_bytes(array))
    blob = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.IdxFormatError, match="truncated"):
        data.read_idx(tmp_path / "cut.gz")


def test_not_gzip_raises_clear_error(tmp_path):
    (tmp_path / "junk.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(data.IdxFormatError, match="corrupt"):
        data.read_idx(tmp_path / "junk.gz")


def test_idx_payload_shorter_than_header_raises(tmp_path):
    array = np.zeros((10, 28, 28), np.uint8)
    write_gz(tmp_path / "short.gz", idx_bytes(array)[:-100])  # valid gzip, short payload
    with pytest.raises(data.IdxFormatError, match=r"declares shape \(10, 28, 28\)"):
        data.read_idx(tmp_path / "short.gz")


def test_idx_bad_magic_raises(tmp_path):
    write_gz(tmp_path / "bad.gz", b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.IdxFormatError, match="magic"):
        data.read_idx(tmp_path / "bad.gz")
