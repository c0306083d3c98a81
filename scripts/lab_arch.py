"""The lab's architectures and boards: which stand-in is which, and qemu for the foreign ones.

A lab spec names each stand-in's architecture, and for arm64 its board:

    --arch arm64                      # every stand-in arm64, boards pi4, pi5, pi4, ... in turn
    --arch x86_64,arm64,arm64         # one per host: pi-1 x86-64, pi-2 a Pi 4, pi-3 a Pi 5
    --arch amd64,arm64:pi5            # a board named explicitly (pi4 or pi5)

A single item applies to every host; a list gives one item per host (and the host count when
``--hosts`` is not given). ``x86_64`` is also spelled ``amd64``; ``arm64`` also ``aarch64``.

arm64 stand-ins run under qemu-user: ``qemu-aarch64`` registered with binfmt_misc with the flags
``F`` (the kernel opens the interpreter at registration, so a container runs arm64 binaries
without qemu inside it) and ``C`` (setuid programs such as sudo take their own credentials, not
the interpreter's). Each carries a Pi's device tree ``model`` and ``compatible``, bound in at
``/sys/firmware`` (``devicetree/base/...``): ``/proc/device-tree`` is a symlink to
``/sys/firmware/devicetree/base`` on a Pi, and runc refuses bind mounts inside ``/proc``.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
# Debian's name of the workstation's own architecture (the one that needs no emulation).
NATIVE = ARCH_ALIASES.get(platform.machine(), platform.machine())


@dataclass(frozen=True)
class Board:
    """A Raspberry Pi model, as its device tree names it."""

    model: str
    compatible: tuple[str, ...]


BOARDS = {
    "pi4": Board("Raspberry Pi 4 Model B Rev 1.5", ("raspberrypi,4-model-b", "brcm,bcm2711")),
    "pi5": Board("Raspberry Pi 5 Model B Rev 1.0", ("raspberrypi,5-model-b", "brcm,bcm2712")),
}
# qemu-user's binfmt_misc entry for arm64 ELF executables (as Debian's qemu-user-static has it).
AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Debian's interpreter: the "-P" name tells qemu that binfmt_misc preserves argv[0] (flag P).
QEMU_AARCH64 = (
    (Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P"), "P"),
    (Path("/usr/bin/qemu-aarch64-static"), ""),
)


class ArchError(RuntimeError):
    """A lab spec that does not parse, or an emulation that cannot be set up."""


@dataclass(frozen=True)
class HostSpec:
    """One stand-in: its Debian architecture and, for arm64, its board (``pi4``, ``pi5``)."""

    arch: str
    board: str = ""


def parse_spec(spec: str, hosts: int | None) -> list[HostSpec]:
    """``--arch`` and ``--hosts`` into one ``HostSpec`` per stand-in (see the module's doc)."""
    items = [item.strip() for item in spec.split(",") if item.strip()] or [NATIVE]
    if len(items) == 1:
        items = items * (hosts if hosts is not None else 3)
    elif hosts is not None and hosts != len(items):
        raise ArchError(f"--arch names {len(items)} hosts, --hosts asks for {hosts}")
    out = []
    arm = 0
    for item in items:
        name, _, board = item.partition(":")
        arch = ARCH_ALIASES.get(name.lower())
        if arch is None:
            raise ArchError(f"--arch {item!r}: unknown architecture (x86_64/amd64, arm64/aarch64)")
        if arch == "arm64":
            board = board or ("pi4", "pi5")[arm % 2]
            arm += 1
            if board not in BOARDS:
                raise ArchError(f"--arch {item!r}: unknown board (one of {', '.join(BOARDS)})")
        elif board:
            raise ArchError(f"--arch {item!r}: only arm64 stand-ins carry a board")
        out.append(HostSpec(arch, board))
    return out


def binfmt_entry() -> str:
    """The register line for qemu-aarch64 (name, magic, mask, interpreter, flags)."""
    for interpreter, preserve in QEMU_AARCH64:
        if interpreter.exists():
            return (f":qemu-aarch64:M:0:{AARCH64_MAGIC}:{AARCH64_MASK}:{interpreter}:"
                    f"{preserve}OCF")  # fmt: skip
    raise ArchError("arm64 stand-ins need qemu-user-static: apt-get install qemu-user-static")


def ensure_binfmt(mount: bool = True) -> str:
    """qemu-aarch64 registered with binfmt_misc with the flags ``F`` and ``C``; returns what was
    done. Mounts binfmt_misc when the kernel has it and it is not mounted; one line saying what
    is missing otherwise."""
    line = binfmt_entry()
    if not (BINFMT / "register").exists():
        filesystems = Path("/proc/filesystems").read_text()
        if "binfmt_misc" not in filesystems:
            raise ArchError(
                "arm64 stand-ins need binfmt_misc, and this kernel has none (no binfmt_misc in "
                "/proc/filesystems, no CONFIG_BINFMT_MISC): qemu-user cannot run them here"
            )
        if not mount or shutil.which("mount") is None:
            raise ArchError(f"binfmt_misc not mounted: mount -t binfmt_misc binfmt_misc {BINFMT}")
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise ArchError(f"mount -t binfmt_misc binfmt_misc {BINFMT} (needs root): "
                            f"{done.stderr.strip()}")  # fmt: skip
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        lines = entry.read_text().splitlines()
        fields = dict(row.split(" ", 1) for row in lines if " " in row)
        flags = fields.get("flags:", "")
        if lines[:1] == ["enabled"] and {"F", "C"} <= set(flags):
            return f"qemu-aarch64 already registered (flags {flags.strip()})"
        # Registered without F or C (Debian's default has F only): replace it.
        entry.write_text("-1\n")
    try:
        (BINFMT / "register").write_text(line + "\n")
    except OSError as err:
        raise ArchError(f"qemu-aarch64: binfmt_misc refused the entry (root?): {err}") from err
    return "qemu-aarch64 registered with binfmt_misc (flags OCF)"


def board_tree(board: str, cache: Path) -> Path:
    """A folder to bind at the stand-in's ``/sys/firmware``: ``devicetree/base/model`` and
    ``compatible`` as a Pi's firmware writes them (NUL-terminated strings)."""
    spec = BOARDS[board]
    base = cache / "boards" / board / "firmware" / "devicetree" / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "model").write_bytes(spec.model.encode() + b"\0")
    (base / "compatible").write_bytes(b"".join(c.encode() + b"\0" for c in spec.compatible))
    return base.parents[1]
