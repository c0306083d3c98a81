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


def test_each_pi_class_is_cross_built_apart_for_its_own_arm_architecture() -> None:
    pi4, pi5 = llamacpp.flags("native", "pi4"), llamacpp.flags("native", "pi5")
    assert "-DGGML_CPU_ARM_ARCH=armv8-a+crc" in pi4
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+crc+dotprod+fp16" in pi5
    for flags in (pi4, pi5):
        assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_NATIVE=ON" not in flags
        assert "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++" in flags
        assert not any("amx" in flag for flag in flags)  # the x86 host's own switches stay home
    assert "-DGGML_BLAS=ON" in llamacpp.flags("openblas", "pi4")
    dirs = {llamacpp.build_dir(v, b) for v in llamacpp.VARIANTS for b in (None, *llamacpp.BOARDS)}
    assert len(dirs) == 6
    assert llamacpp.build_dir("native", "pi5").name.startswith("cross-pi5-native-")
    with pytest.raises(llamacpp.LlamaCppError, match="unknown board 'pi3'"):
        llamacpp.flags("native", "pi3")


def test_a_cross_build_without_the_toolchain_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path_with(tmp_path, monkeypatch, ccache=False)
    with pytest.raises(llamacpp.LlamaCppError, match="crossbuild-essential-arm64"):
        llamacpp.build("native", board="pi4")
    assert not llamacpp.build_dir("native", "pi4").exists()  # nothing half-made


def _tree(tmp_path: Path, text: str) -> Path:
    """A source tree holding the one file pidistill patches, with ``text`` in it."""
    name = llamacpp.PATCHES[0][0]
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


def test_the_source_is_patched_once_and_a_second_pass_changes_nothing(tmp_path: Path) -> None:
    name, old, new = llamacpp.PATCHES[0]
    path = _tree(tmp_path, "int main() {\n" + old)
    assert llamacpp.apply_patches(tmp_path) == [name]
    assert path.read_text(encoding="utf-8") == "int main() {\n" + new
    assert "common_log_flush(common_log_main());" in new
    assert llamacpp.apply_patches(tmp_path) == []
    assert path.read_text(encoding="utf-8") == "int main() {\n" + new


@pytest.mark.parametrize("copies", [0, 2])
def test_a_source_that_is_not_the_pins_is_refused_and_left_as_it_was(
    tmp_path: Path, copies: int
) -> None:
    text = "int main() {\n" + llamacpp.PATCHES[0][1] * copies
    path = _tree(tmp_path, text)
    with pytest.raises(llamacpp.LlamaCppError, match=rf"perplexity.cpp: .* found {copies} times"):
        llamacpp.apply_patches(tmp_path)
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_the_patches_are_part_of_a_builds_key(monkeypatch: pytest.MonkeyPatch) -> None:
    patched = llamacpp.build_dir("native", "pi4")
    monkeypatch.setattr(llamacpp, "PATCHES", ())
    assert llamacpp.build_dir("native", "pi4") != patched
