"""The lab's spelling of architectures per host (scripts/lab_arch.py) and its binfmt entry."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import lab
import lab_arch
from lab_arch import ArchError, HostSpec, parse_spec

X86 = HostSpec("amd64")
PI4 = HostSpec("arm64", "pi4")
PI5 = HostSpec("arm64", "pi5")


@dataclass(frozen=True)
class Case:
    id: str
    spec: str
    hosts: int | None
    want: list[HostSpec]


CASES = [
    Case("one arch applies to every host, boards alternate", "arm64", 3, [PI4, PI5, PI4]),
    Case("aarch64 is arm64", "aarch64", 2, [PI4, PI5]),
    Case("a list gives one per host and the count", "x86_64,arm64,arm64", None, [X86, PI4, PI5]),
    Case("a board can be named", "amd64,arm64:pi5", 2, [X86, PI5]),
    Case("three hosts by default", "x86_64", None, [X86, X86, X86]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_lab_spec_reads_as_one_host_spec_per_stand_in(case: Case) -> None:
    assert parse_spec(case.spec, case.hosts) == case.want


@pytest.mark.parametrize(
    "spec,hosts,says",
    [
        ("arm64,arm64", 3, "names 2 hosts"),
        ("riscv64", 1, "unknown architecture"),
        ("arm64:pi3", 1, "unknown board"),
        ("x86_64:pi4", 1, "only arm64"),
    ],
)
def test_a_bad_spec_says_why(spec: str, hosts: int, says: str) -> None:
    with pytest.raises(ArchError, match=says):
        parse_spec(spec, hosts)


def test_the_binfmt_entry_fixes_the_binary_and_takes_setuid_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    qemu = tmp_path / "qemu-aarch64-static"
    qemu.touch()
    monkeypatch.setattr(lab_arch, "QEMU_AARCH64", ((tmp_path / "absent-P", "P"), (qemu, "")))
    name, kind, offset, magic, _mask, interpreter, flags = lab_arch.binfmt_entry()[1:].split(":")
    assert (name, kind, offset, interpreter) == ("qemu-aarch64", "M", "0", str(qemu))
    assert {"F", "C"} <= set(flags)
    assert magic.endswith(r"\xb7\x00")  # EM_AARCH64


def test_a_kernel_without_binfmt_misc_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    qemu = tmp_path / "qemu"
    qemu.touch()
    monkeypatch.setattr(lab_arch, "QEMU_AARCH64", ((qemu, ""),))
    monkeypatch.setattr(lab_arch, "BINFMT", tmp_path / "binfmt_misc")
    monkeypatch.setattr(lab_arch, "Path", _FakeProc(tmp_path, "nodev\tproc\nnodev\ttmpfs\n"))
    with pytest.raises(ArchError) as err:
        lab_arch.ensure_binfmt()
    assert "binfmt_misc" in str(err.value) and "\n" not in str(err.value)


class _FakeProc:
    """``Path`` whose /proc/filesystems is ``text``."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.file = tmp_path / "filesystems"
        self.file.write_text(text)

    def __call__(self, name: str) -> Path:
        return self.file if name == "/proc/filesystems" else Path(name)


def test_the_x86_recipe_key_is_unchanged_and_arm64_has_its_own() -> None:
    assert lab.recipe_key() == lab.recipe_key("amd64")
    assert lab.recipe_key("arm64") != lab.recipe_key("amd64")
    assert lab.image_name("amd64") == "localhost/pidistill-lab:bookworm"
    assert lab.image_name("arm64") == "localhost/pidistill-lab:bookworm-arm64"
