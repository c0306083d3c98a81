"""Helpers of the fleet tests: ansible's environment, running commands, reading a recap.

A module of its own (not conftest.py): test files import it by a name no other folder uses.
"""

from __future__ import annotations

import hashlib
import json
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


def fleet_env(**extra: str) -> dict[str, str]:
    """The environment ansible and molecule run in: the venv first, the project's ansible.cfg."""
    return {
        **os.environ,
        **extra,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    }


def run(
    cmd: list[str],
    *,
    cwd: Path = ROOT,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a command in the fleet environment; on failure fail the test with its output's tail."""
    done = subprocess.run(
        cmd, cwd=cwd, env=fleet_env(**(env or {})), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    if check and done.returncode != 0:
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


def make_export(
    out: Path, weights: bytes, name: str = "student", quant: str = "F16", kind: str = "decoder"
) -> Path:
    """A folder laid out as `distill export` writes it: GGUF, its .sha256, manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    gguf = out / f"{name}-{quant}.gguf"
    gguf.write_bytes(weights)
    digest = hashlib.sha256(weights).hexdigest()
    gguf.with_name(gguf.name + ".sha256").write_text(f"{digest}  {gguf.name}\n")
    manifest = {
        "name": name,
        "kind": kind,
        "files": [{"quant": quant, "file": gguf.name, "bytes": len(weights), "sha256": digest}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def version_of(export: Path) -> str:
    """The version name model_sync gives an export in the agents' stores."""
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["files"][0]
    return f"{manifest['name']}-{entry['quant']}-{entry['sha256'][:12]}"


def lab_module():
    """scripts/lab.py as a module (its link helpers: host_veth, tc_cap)."""
    sys.path.insert(0, str(LAB.parent))
    import lab

    return lab


def stand_in_link(host: str) -> tuple[str, int]:
    """The workstation's end of stand-in ``host``'s link (``pi-2`` -> ``veth1``), and its PID."""
    return lab_module().host_veth(f"pidistill-{host}")


def cap_uplink(host: str, rate: str) -> None:
    """Cap what stand-in ``host`` sends (its uplink) at ``rate`` (tc; ``0``: no cap)."""
    _, pid = stand_in_link(host)
    lab_module().tc_cap("eth0", rate, netns_pid=pid)


def link_counter(host: str, counter: str = "rx_bytes") -> int:
    """A counter of the workstation's end of ``host``'s link (rx_bytes: what the host sent)."""
    veth, _ = stand_in_link(host)
    return int(Path(f"/sys/class/net/{veth}/statistics/{counter}").read_text())


def foreign_ca(base: Path) -> Path:
    """A CA of another fleet (the openssl command line; EC P-256): it signed none of the lab's
    agents, so a client that trusts only it must be refused by all of them."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "2",
         "-subj", "/CN=another fleet", "-addext", "basicConstraints=critical,CA:TRUE"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    return base / "other.pem"
