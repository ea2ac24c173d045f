"""Atomic output: a result appears whole or not at all, and nothing is overwritten unasked."""
from __future__ import annotations

import pytest

from diffpress import DiffpressError
from diffpress._io import atomic_dir, atomic_file


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_success(tmp_path):
    out = tmp_path / "nested" / "result"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".result.") and tmp.is_dir()
        assert not out.exists()  # nothing visible until the block ends
        (tmp / "a.txt").write_text("hi")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert (out / "a.txt").read_text() == "hi" and (out / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert entries(out.parent) == ["result"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_dir_leaves_nothing_on_error(tmp_path, exc):
    out = tmp_path / "result"
    with pytest.raises(type(exc)):
        with atomic_dir(out) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise exc
    assert not out.exists()
    assert entries(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_error_keeps_the_old_result(tmp_path, exc):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise exc
    assert entries(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert entries(tmp_path) == ["result"]


def test_atomic_dir_refuses_existing_path(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(DiffpressError, match=r"result already exists; pass --force \(force=True\) to overwrite it"):
        with atomic_dir(out):
            pytest.fail("the block must not run")  # pragma: no cover
    assert entries(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "keep"
    assert entries(tmp_path) == ["result"]


def test_atomic_dir_refuses_existing_file(tmp_path):
    out = tmp_path / "result"
    out.write_text("a file")
    with pytest.raises(DiffpressError, match="already exists"):
        with atomic_dir(out):
            pass  # pragma: no cover
    assert out.read_text() == "a file"


def test_atomic_dir_force_replaces(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old result stays until the new one is complete
    assert entries(out) == ["new.txt"] and (out / "new.txt").read_text() == "new"
    assert entries(tmp_path) == ["result"]  # no temporary or ".old-" folder left


def test_atomic_dir_force_replaces_a_file(tmp_path):
    out = tmp_path / "result"
    out.write_text("a file")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "x").write_text("1")
    assert out.is_dir() and entries(out) == ["x"]
    assert entries(tmp_path) == ["result"]


def test_atomic_file(tmp_path):
    out = tmp_path / "report.json"
    with atomic_file(out) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == tmp_path and tmp != out
        tmp.write_text("{}")
    assert out.read_text() == "{}"
    with pytest.raises(DiffpressError, match="already exists"):
        with atomic_file(out):
            pass  # pragma: no cover
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(out, force=True) as tmp:
            tmp.write_text('{"half": ')
            raise KeyboardInterrupt
    assert out.read_text() == "{}"
    with atomic_file(out, force=True) as tmp:
        tmp.write_text("[1]")
    assert out.read_text() == "[1]"
    assert entries(tmp_path) == ["report.json"]
