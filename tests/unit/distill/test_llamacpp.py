"""distill.llamacpp: build directories keyed by flags, ccache as a launcher outside that key."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill import llamacpp


def _path_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, ccache: bool) -> None:
    """PATH holds only a folder that has (or lacks) an executable named ``ccache``."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    if ccache:
        tool = folder / "ccache"
        tool.write_text('#!/bin/sh\nexec "$@"\n')
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path / "cache"))


def test_with_ccache_compiles_go_through_it_with_a_cache_inside_the_project_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path_with(tmp_path, monkeypatch, ccache=True)
    flags, env = llamacpp.launcher()
    assert flags == ("-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    assert env["CCACHE_DIR"] == str(tmp_path / "cache" / "llama.cpp" / "ccache")
    # The variants' build directories are siblings under this base: their paths hash alike.
    assert Path(env["CCACHE_BASEDIR"]) == llamacpp.build_dir("native").parent


def test_without_ccache_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _path_with(tmp_path, monkeypatch, ccache=False)
    assert llamacpp.launcher() == ((), {})


def test_the_launcher_is_not_part_of_a_builds_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build made before ccache was installed is still found afterwards (no 20-minute rebuild)."""
    _path_with(tmp_path, monkeypatch, ccache=False)
    before = llamacpp.build_dir("openblas")
    monkeypatch.undo()
    _path_with(tmp_path / "again", monkeypatch, ccache=True)
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    assert llamacpp.build_dir("openblas") == before
    assert not any("LAUNCHER" in flag for flag in llamacpp.flags("openblas"))


def test_variants_differ_in_their_build_directory() -> None:
    assert llamacpp.build_dir("native") != llamacpp.build_dir("openblas")
    with pytest.raises(llamacpp.LlamaCppError, match="unknown build variant 'cuda'"):
        llamacpp.flags("cuda")
