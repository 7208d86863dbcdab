"""Tests of pocketzo._io: atomic files and directories."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pocketzo._io import atomic_dir, atomic_open, write_json


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_open_success_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.jsonl"  # parent directories are created
    with atomic_open(target, "w") as handle:
        handle.write("héllo\nworld\n")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == "héllo\nworld\n".encode()  # UTF-8, "\n" line endings
    assert _listing(target.parent) == ["out.jsonl"]
    assert _mode(target) == 0o644  # not mkstemp's 0o600


def test_atomic_open_failure_keeps_old_content_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as handle:
        handle.write(b"half written")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["out.bin"]


def test_atomic_dir_replaces_whole_directory_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.txt").write_text("stale", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
        raise RuntimeError("interrupted")
    assert _listing(tmp_path) == ["model"] and _listing(final) == ["stale.txt"]
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
        assert not (final / "new.txt").exists()  # nothing visible until the block ends
    assert _listing(tmp_path) == ["model"] and _listing(final) == ["new.txt"]
    assert _mode(final) == 0o755  # not mkdtemp's 0o700


def test_atomic_dir_creates_a_new_directory_and_replaces_a_file(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "a" / "fresh") as tmp:
        (tmp / "x").write_text("x", encoding="utf-8")
    assert _listing(tmp_path / "a" / "fresh") == ["x"]
    (tmp_path / "was_a_file").write_text("old", encoding="utf-8")
    with atomic_dir(tmp_path / "was_a_file") as tmp:
        (tmp / "y").write_text("y", encoding="utf-8")
    assert _listing(tmp_path / "was_a_file") == ["y"]
    assert _listing(tmp_path) == ["a", "was_a_file"]


def test_write_json_format(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"b": "é", "a": [1]})
    assert path.read_text(encoding="utf-8") == '{\n  "b": "é",\n  "a": [\n    1\n  ]\n}\n'
    write_json(path, {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "b": 1}


def test_output_is_readable_by_everyone_whatever_the_umask(tmp_path: Path) -> None:
    """Bundles and runs are copied to phones and served to browsers: files 0644, directories 0755."""
    old = os.umask(0o077)
    try:
        with atomic_open(tmp_path / "file.json", "w") as handle:
            handle.write("{}")
        with atomic_dir(tmp_path / "bundle") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "model.onnx.data").write_bytes(b"x")
            os.chmod(tmp / "sub" / "model.onnx.data", 0o600)  # as onnx writes external data
            write_json(tmp / "manifest.json", {})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "file.json") == 0o644
    bundle = tmp_path / "bundle"
    assert [_mode(p) for p in (bundle, bundle / "sub")] == [0o755, 0o755]
    assert [_mode(p) for p in (bundle / "manifest.json", bundle / "sub" / "model.onnx.data")] == [0o644, 0o644]
