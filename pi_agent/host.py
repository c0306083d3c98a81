"""Facts about the host, read from ``/proc`` and ``/sys`` under a configurable root.

Tests point ``root`` at fake trees of a Pi 4 and a Pi 5 (``tests/fixtures/pi_agent``); on a Pi it
is ``/``. Every reader raises ``OSError``/``ValueError`` on a missing or odd file and leaves the
choice of what that means to its caller (a collector reports failure, ``/v1/status`` a null).

The throttling word comes from ``vcgencmd`` where it works, which is a process: one that fails
(the agent's user outside the ``video`` group), hangs or is missing gives way to sysfs within
``VCGENCMD_TIMEOUT_S``. On the event loop, ``await throttled_async``: it runs vcgencmd off the
loop and answers ``None`` for "unknown" instead of raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Bits of the firmware's get_throttled word (Raspberry Pi documentation, vcgencmd).
THROTTLE_BITS = {
    "under_voltage": 0,
    "arm_freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}
SINCE_BOOT_SHIFT = 16
SYSFS_THROTTLED = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/*/*:firmware/get_throttled",
    "sys/devices/platform/*firmware*/get_throttled",
)
USER_HZ = 100
VCGENCMD_TIMEOUT_S = 2.0  # it answers in tens of ms; a 4 s one stalled the agent

log = logging.getLogger(__name__)
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class Host:
    """The ``/proc`` and ``/sys`` of one machine, under ``root``."""

    root: Path = Path("/")

    def path(self, relative: str) -> Path:
        """``root``/``relative``."""
        return self.root / relative

    def board_model(self) -> str:
        """``/proc/device-tree/model`` (NUL-terminated on a Pi), else where that symlink points,
        ``/sys/firmware/devicetree/base/model``: a container's own /proc has no device tree
        (the lab binds a Pi's at /sys/firmware)."""
        try:
            return self.path("proc/device-tree/model").read_bytes().rstrip(b"\0\n").decode()
        except FileNotFoundError:
            path = self.path("sys/firmware/devicetree/base/model")
            return path.read_bytes().rstrip(b"\0\n").decode()

    def board(self) -> str:
        """A short board id for the throughput table: ``pi4``, ``pi5``... or ``unknown``."""
        try:
            model = self.board_model()
        except OSError:
            return "unknown"
        match = re.search(r"Raspberry Pi (\d+)", model)
        if match:
            return f"pi{match.group(1)}"
        if "Compute Module 4" in model:
            return "pi4"
        if "Compute Module 5" in model:
            return "pi5"
        return "unknown"

    def hostname(self) -> str:
        """The host name (from ``proc/sys/kernel/hostname`` under root, else the socket's)."""
        try:
            return self.path("proc/sys/kernel/hostname").read_text().strip()
        except OSError:
            return socket.gethostname()

    def uptime_seconds(self) -> float:
        """Seconds since boot."""
        return float(self.path("proc/uptime").read_text().split()[0])

    def thermal_zones(self) -> list[tuple[str, str, float]]:
        """``(zone, type, celsius)`` of every thermal zone."""
        base = self.path("sys/class/thermal")
        if not base.is_dir():
            raise OSError(f"{base}: no thermal zones")
        zones = []
        for zone in sorted(base.glob("thermal_zone*"), key=lambda p: _natural(p.name)):
            kind = (zone / "type").read_text().strip()
            millis = int((zone / "temp").read_text().strip())
            zones.append((zone.name, kind, millis / 1000.0))
        return zones

    def temperature(self) -> float | None:
        """The CPU temperature in °C (the first thermal zone), or ``None``."""
        try:
            zones = self.thermal_zones()
        except (OSError, ValueError):
            return None
        return zones[0][2] if zones else None

    def throttled_sysfs(self) -> int:
        """The firmware's get_throttled word, from sysfs."""
        for pattern in SYSFS_THROTTLED:
            for path in sorted(self.root.glob(pattern)):
                return int(path.read_text().strip(), 16)
        raise OSError("no get_throttled in sysfs")

    def throttled(self, vcgencmd: str = "", timeout: float = VCGENCMD_TIMEOUT_S) -> tuple[int, str]:
        """The get_throttled word and its source: ``vcgencmd`` where it answers within
        ``timeout``, else sysfs. Blocks meanwhile: on the event loop, await ``throttled_async``."""
        if vcgencmd and os.access(vcgencmd, os.X_OK):
            try:
                out = subprocess.run(
                    [vcgencmd, "get_throttled"],
                    capture_output=True, text=True, timeout=timeout, check=True,
                ).stdout  # fmt: skip
                return parse_vcgencmd_throttled(out), "vcgencmd"
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                log.debug("%s get_throttled failed, reading sysfs: %s", vcgencmd, exc)
        return self.throttled_sysfs(), "sysfs"

    async def throttled_async(
        self, vcgencmd: str = "", timeout: float = VCGENCMD_TIMEOUT_S
    ) -> tuple[int, str] | None:
        """``throttled`` without blocking the event loop; ``None`` when neither vcgencmd nor
        sysfs can tell."""
        if vcgencmd and os.access(vcgencmd, os.X_OK):
            try:
                out = await _run(vcgencmd, "get_throttled", timeout=timeout)
                return parse_vcgencmd_throttled(out), "vcgencmd"
            except (OSError, ValueError, TimeoutError) as exc:
                log.debug("%s get_throttled failed, reading sysfs: %s", vcgencmd, exc)
        try:
            return self.throttled_sysfs(), "sysfs"
        except (OSError, ValueError):
            return None

    def meminfo(self) -> dict[str, int]:
        """``/proc/meminfo`` in bytes."""
        out = {}
        for line in self.path("proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                value = int(fields[0])
                out[name] = value * 1024 if len(fields) > 1 and fields[1] == "kB" else value
        return out

    def zram(self) -> list[dict[str, object]]:
        """Every zram device: ``mm_stat`` fields, disksize and the selected algorithm."""
        devices = []
        for dev in sorted(self.path("sys/block").glob("zram*"), key=lambda p: _natural(p.name)):
            stat = [int(v) for v in (dev / "mm_stat").read_text().split()]
            names = (
                "orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
            )  # fmt: skip
            info: dict[str, object] = dict(zip(names, stat, strict=False))
            info["device"] = dev.name
            info["disksize"] = int((dev / "disksize").read_text().strip())
            algorithms = (dev / "comp_algorithm").read_text()
            chosen = re.search(r"\[([^\]]+)\]", algorithms)
            info["algorithm"] = chosen.group(1) if chosen else algorithms.strip()
            devices.append(info)
        return devices

    def cpu_times(self) -> list[tuple[str, dict[str, float]]]:
        """Per-CPU seconds by mode, from ``/proc/stat``."""
        out = []
        for line in self.path("proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *ticks = line.split()
                modes = {m: int(t) / USER_HZ for m, t in zip(CPU_MODES, ticks, strict=False)}
                out.append((name[3:], modes))
        return out

    def loadavg(self) -> tuple[float, float, float]:
        """1, 5 and 15 minute load averages."""
        one, five, fifteen = self.path("proc/loadavg").read_text().split()[:3]
        return float(one), float(five), float(fifteen)

    def cpu_frequencies(self) -> list[tuple[str, float]]:
        """``(cpu, hertz)`` from cpufreq's scaling_cur_freq."""
        base = self.path("sys/devices/system/cpu")
        out = []
        for path in sorted(
            base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq"),
            key=lambda p: _natural(p.parent.parent.name),
        ):
            out.append((path.parent.parent.name[3:], int(path.read_text().strip()) * 1000.0))
        return out


async def _run(*command: str, timeout: float) -> str:
    """A command's stdout; ``OSError`` when it exits non-zero, ``TimeoutError`` (and the command
    killed) when it takes longer than ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # a timeout, or the caller cancelled: leave nothing running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise OSError(f"{command[0]} exited with {proc.returncode}")
    return out.decode(errors="replace")


def decode_throttled(word: int) -> dict[str, dict[str, bool]]:
    """``{"now": {...}, "since_boot": {...}}`` from a get_throttled word."""
    return {
        "now": {name: bool(word >> bit & 1) for name, bit in THROTTLE_BITS.items()},
        "since_boot": {
            name: bool(word >> (bit + SINCE_BOOT_SHIFT) & 1) for name, bit in THROTTLE_BITS.items()
        },
    }


def parse_vcgencmd_throttled(text: str) -> int:
    """``throttled=0x50005`` → 0x50005."""
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", text)
    if not match:
        raise ValueError(f"unexpected vcgencmd output {text.strip()!r}")
    return int(match.group(1), 16)


def _natural(name: str) -> tuple[str, int]:
    match = re.match(r"(\D*)(\d*)", name)
    assert match is not None
    return match.group(1), int(match.group(2) or -1)
