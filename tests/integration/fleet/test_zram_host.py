"""The zram role's script on the host's real kernel: a device is made swap, then removed.

Swap is not namespaced, so this touches the host: a small device (64 MiB), a private state file,
and whatever zram devices existed before are there again afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "roles" / "zram" / "files" / "pidistill-zram"
CONTROL = Path("/sys/class/zram-control")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="zram devices need root"),
    pytest.mark.skipif(not CONTROL.is_dir(), reason="this kernel has no zram"),
    pytest.mark.skipif(shutil.which("zramctl") is None, reason="zramctl (util-linux) missing"),
]


def zram_devices() -> set[str]:
    return {p.name for p in Path("/sys/block").glob("zram*")}


def swaps() -> str:
    return Path("/proc/swaps").read_text()


def script(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT), action], env=env, capture_output=True, text=True, check=False
    )


def test_script_makes_a_zram_swap_with_a_fallback_algorithm_then_removes_it(
    tmp_path: Path, zram_lock: None
) -> None:
    before = zram_devices()
    state = tmp_path / "device"
    env = {
        **os.environ,
        "ZRAM_SIZE_MB": "64",
        # zstd first, as on a Pi: this kernel lacks it, so the script must fall back.
        "ZRAM_ALGORITHMS": "zstd lz4 lzo-rle lzo",
        "ZRAM_PRIORITY": "77",
        "ZRAM_STATE": str(state),
    }
    try:
        started = script("start", env)
        assert started.returncode == 0, started.stderr
        device = state.read_text().strip()
        name = Path(device).name
        algorithms = Path(f"/sys/block/{name}/comp_algorithm").read_text()
        chosen = algorithms.split("[", 1)[1].split("]", 1)[0]
        offered = algorithms.replace("[", "").replace("]", "").split()
        expected = next(a for a in ("zstd", "lz4", "lzo-rle", "lzo") if a in offered)
        assert chosen == expected
        assert int(Path(f"/sys/block/{name}/disksize").read_text()) == 64 * 1024 * 1024
        line = next(line for line in swaps().splitlines() if line.startswith(device + " "))
        assert line.split()[-1] == "77"  # the priority
        again = script("start", env)
        assert again.returncode == 0 and "already on" in again.stdout  # a re-start is a no-op
        assert script("status", env).returncode == 0

        stopped = script("stop", env)
        assert stopped.returncode == 0, stopped.stderr
        assert device not in swaps()
        assert not state.exists()
        assert script("status", env).returncode == 3
    finally:
        if state.exists():
            script("stop", env)
        # `zramctl --reset` removes the device on some kernels: give back what was there.
        while len(zram_devices()) < len(before):
            (CONTROL / "hot_add").read_text()
