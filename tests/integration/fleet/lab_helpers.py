"""What the lab's tests share: the stand-ins' names and addresses (the inventory lab.py wrote),
their tokens, the fleet's CA, calls to their agents over HTTPS and commands on them (SSH or
podman exec), and the playbook command lines."""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from fleet_helpers import ROOT, fleet_env, lab_module, version_of

PLAYBOOK = str(ROOT / ".venv" / "bin" / "ansible-playbook")

IMAGE = "localhost/pidistill-lab:bookworm"

HOSTS = ["pi-1", "pi-2", "pi-3"]


def lab_hosts(inventory: Path) -> dict[str, dict]:
    return yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"]


FLEET_CA = ROOT / ".cache" / "fleet" / "ca"


def token(host: str) -> str:
    return (ROOT / ".cache" / "fleet" / "tokens" / host).read_text().strip()


def fleet_tls() -> ssl.SSLContext:
    """A client context that trusts the fleet's CA alone (the pi_agent role made it)."""
    return ssl.create_default_context(cafile=FLEET_CA / "ca.pem")


def agent_get(inventory: Path, host: str, path: str) -> dict:
    """GET an agent endpoint from the workstation, at the stand-in's address on the lab network,
    over HTTPS verified against the fleet's CA."""
    request = urllib.request.Request(
        lab_hosts(inventory)[host]["pi_agent_url"] + path,
        headers={"Authorization": f"Bearer {token(host)}"},
    )
    with urllib.request.urlopen(request, timeout=30, context=fleet_tls()) as response:
        return json.loads(response.read())


def on_board(inventory: Path, host: str, command: str, stdin: str | None = None) -> str:
    """Run a shell command as root on a stand-in over SSH; its standard output."""
    argv = lab_module().ssh_args(ROOT / ".cache" / "lab" / "ssh" / "id_ed25519",
                                 lab_hosts(inventory)[host]["ansible_host"])  # fmt: skip
    done = subprocess.run([*argv, "sudo", "-n", "sh", "-c", shlex.quote(command)], input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, f"{host}: {command}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def allowlist(inventory: Path, host: str) -> set[str]:
    """The sha256s a board's allowlist names."""
    text = on_board(inventory, host, "cat /etc/pi-agent/allowlist")
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


def active_version(inventory: Path, host: str) -> str | None:
    data = agent_get(inventory, host, "/v1/models")["data"]
    return next((m["version"] for m in data if m["active"]), None)


def site(inventory: Path, export: Path, results: Path, *extra: str) -> list[str]:
    return [PLAYBOOK, "playbooks/site.yml", "-i", str(inventory), "-e", f"fleet_model_dir={export}",
            "-e", f"bench_results_dir={results}", *extra]  # fmt: skip


def agent_call(
    inventory: Path,
    host: str,
    method: str,
    path: str,
    data: bytes | None = None,
    ctype: str = "application/json",
    timeout: float = 300,
) -> tuple[int, dict]:
    """One request to an agent from the workstation; the status and the JSON answer."""
    request = urllib.request.Request(
        lab_hosts(inventory)[host]["pi_agent_url"] + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token(host)}", "Content-Type": ctype},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=fleet_tls()) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def delivery(inventory: Path, export: Path, *extra: str) -> list[str]:
    """deploy.yml's delivery phase only: the model into the stores, no switch."""
    return [PLAYBOOK, "playbooks/deploy.yml", "-i", str(inventory), "--tags", "model_sync_install",
            "-e", f"fleet_model_dir={export}", *extra]  # fmt: skip


def background(cmd: list[str]) -> subprocess.Popen:
    """A playbook run in the background, its output (stderr included) on a pipe."""
    return subprocess.Popen(cmd, cwd=ROOT, env=fleet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def holds(inventory: Path, host: str, export: Path) -> bool:
    return version_of(export) in [
        m["version"] for m in agent_get(inventory, host, "/v1/models")["data"]
    ]


def on_stand_in(host: str, *argv: str) -> str:
    """A command's output inside a stand-in, as root (podman exec: no SSH, no Ansible)."""
    done = subprocess.run(["podman", "--runtime", "runc", "exec", f"pidistill-{host}", *argv],
                          capture_output=True, text=True, env=fleet_env(), check=True)  # fmt: skip
    return done.stdout
