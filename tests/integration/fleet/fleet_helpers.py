"""Helpers of the fleet tests: ansible's environment, running commands, reading a recap.

A module of its own (not conftest.py): test files import it by a name no other folder uses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LAB = ROOT / "scripts" / "lab.py"
VENV_BIN = Path(sys.executable).parent


def fleet_env() -> dict[str, str]:
    """The environment ansible and molecule run in: the venv first, the project's ansible.cfg."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    }


def run(cmd: list[str], *, cwd: Path = ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the fleet environment; on failure fail the test with its output's tail."""
    done = subprocess.run(
        cmd, cwd=cwd, env=fleet_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-6000:]
        pytest.fail(f"{' '.join(cmd)}: exit {done.returncode}\n{tail}", pytrace=False)
    return done


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of an ansible-playbook run: host -> {ok, changed, failed, ...}."""
    hosts = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, flags=re.MULTILINE):
        hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return hosts


def require_container_tools() -> None:
    """Stop with a clear message where the lab cannot run at all."""
    if os.geteuid() != 0:
        pytest.skip("the lab runs rootful podman and debootstrap: run the tests as root")
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install podman runc debootstrap")
