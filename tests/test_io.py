"""Tests for ptq_adversary.io: atomic writes are never seen half-written; read_json's errors."""

import json
import os

import pytest

from ptq_adversary import io


def test_write_text_atomic_writes_and_replaces_leaving_no_temporary_file(tmp_path):
    path = str(tmp_path / "out.txt")
    io.write_text_atomic(path, "first\n")
    io.write_text_atomic(path, "second, longer ünïcode\n")
    with open(path, encoding="utf-8") as f:
        assert f.read() == "second, longer ünïcode\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_the_target_holds_the_old_text_until_the_complete_new_file_replaces_it(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "results.json")
    io.write_json_atomic(path, {"old": 1})
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # the moment before the rename: what would a reader see?
        seen.append((open(dst).read(), json.load(open(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    io.write_json_atomic(path, {"new": list(range(1000))})
    assert seen == [('{\n  "old": 1\n}\n', {"new": list(range(1000))})]
    assert io.read_json(path) == {"new": list(range(1000))}


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_litter(tmp_path, monkeypatch):
    path = str(tmp_path / "timing.json")
    io.write_json_atomic(path, {"old": 1})

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        io.write_json_atomic(path, {"new": 2})
    assert io.read_json(path) == {"old": 1}
    assert os.listdir(tmp_path) == ["timing.json"]


def test_write_json_atomic_of_an_unserialisable_value_touches_nothing(tmp_path):
    path = str(tmp_path / "spec.json")
    io.write_json_atomic(path, {"ok": (1, 2)})
    assert open(path).read() == '{\n  "ok": [\n    1,\n    2\n  ]\n}\n'  # indented, newline
    with pytest.raises(TypeError):
        io.write_json_atomic(path, {"bad": object()})
    assert io.read_json(path) == {"ok": [1, 2]}
    assert os.listdir(tmp_path) == ["spec.json"]


def test_read_json_default_only_for_a_missing_file(tmp_path):
    missing = str(tmp_path / "missing.json")
    assert io.read_json(missing, default=None) is None
    assert io.read_json(missing, {"runs": []}) == {"runs": []}
    with pytest.raises(FileNotFoundError):
        io.read_json(missing)
    present = tmp_path / "present.json"
    present.write_text("[1, 2.5, null]")
    assert io.read_json(str(present), default="unused") == [1, 2.5, None]


@pytest.mark.parametrize("text", ['{"step": 3, "acc', "", "not json"])
def test_read_json_of_invalid_text_names_the_file_even_with_a_default(tmp_path, text):
    path = tmp_path / "cut.json"
    path.write_text(text)
    for kwargs in ({}, {"default": {}}):
        with pytest.raises(ValueError, match=rf"^{path} is not valid JSON: ") as info:
            io.read_json(str(path), **kwargs)
        assert info.value.__cause__ is None and info.value.__suppress_context__
