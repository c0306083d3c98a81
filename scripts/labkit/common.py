"""What every step of the lab shares: its names and labels, running podman and commands,
the stand-ins' names, addresses and SSH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PIDISTILL_CACHE_DIR", ROOT / ".cache")) / "lab"
INVENTORY = ROOT / "inventory" / "lab.yml"
IMAGE = "localhost/pidistill-lab:bookworm"
NETWORK = "pidistill-lab"
LABEL = "pidistill.lab"
# Containers inherit the image's labels (molecule's too): the lab's own hosts carry this one.
HOST_LABEL = "pidistill.lab.host"
PREFIX = "pidistill-pi-"
# The architecture and board of a lab host (containers' labels; ``up`` recreates a host whose
# labels differ from what is asked).
ARCH_LABEL = "pidistill.lab.arch"
BOARD_LABEL = "pidistill.lab.board"
# pi-agent's port (pi_agent_port): the TUI, the tests and the other stand-ins reach it.
AGENT_PORT = 8470
# Link caps (tc's token bucket filter): each stand-in's link, both ways, and the workstation's
# uplink into the lab. "0" switches a cap off. This kernel has no sch_netem: no added delay.
LINK_RATE = os.environ.get("LAB_LINK_RATE", "100mbit")
UPLINK_RATE = os.environ.get("LAB_UPLINK_RATE", "100mbit")


class LabError(RuntimeError):
    """A lab step that failed; the message says which and why."""


class InitDied(LabError):
    """A stand-in's PID 1 exited while it booted."""


def sh(cmd: list[str], *, check: bool = True, stdin: str | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its stderr."""
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def podman(*args: str, check: bool = True, stdin: str | None = None) -> str:
    """``podman`` with the runtime these machines need (crun refuses their cgroup layout)."""
    return sh(["podman", "--runtime", "runc", *args], check=check, stdin=stdin)


def ssh_key() -> Path:
    """The lab's generated key pair (private half returned), made once per lab."""
    key = CACHE / "ssh" / "id_ed25519"
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pidistill-lab", "-f", str(key)])
    return key


def containers() -> list[str]:
    """Names of the lab's containers, running or not, in host order."""
    out = podman("ps", "-a", "--filter", f"label={HOST_LABEL}", "--format", "{{.Names}}")
    return sorted(out.split(), key=lambda name: int(name.rsplit("-", 1)[-1]))


def network_exists() -> bool:
    """Whether the lab's podman network is there."""
    return subprocess.run(["podman", "network", "exists", NETWORK], check=False).returncode == 0


def host_name(container: str) -> str:
    """``pidistill-pi-2`` -> ``pi-2``: the inventory name and the container's hostname."""
    return container.removeprefix("pidistill-")


def address(container: str) -> str:
    """The stand-in's IP address on the lab network (the workstation routes to it directly)."""
    out = podman(
        "inspect", "--format",
        f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}', container,
    ).strip()  # fmt: skip
    if not out or out == "<no value>":
        raise LabError(f"{container}: no address on the {NETWORK} network")
    return out


def agent_url(container: str) -> str:
    """``https://<address>:8470``: where the workstation (and the other stand-ins) reach pi-agent
    (its certificate, from the fleet's CA, covers the address)."""
    return f"https://{address(container)}:{AGENT_PORT}"


def ssh_args(key: Path, host: str) -> list[str]:
    """An ``ssh`` command line to ``pi`` on a stand-in (lab only: host keys are not checked)."""
    return [
        "ssh",
        "-i", str(key),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=5",
        f"pi@{host}",
    ]  # fmt: skip
