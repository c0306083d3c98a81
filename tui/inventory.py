"""The fleet as the inventory describes it, read by ansible itself (``ansible-inventory --list``).

    fleet = load_inventory([Path("inventory/lab.yml")])
    fleet.groups["pi5"]          # ["pi-a", "pi-b"]
    fleet.hosts["pi-a"].agent_url  # "https://10.0.0.11:8470"

ansible's own parser runs in a subprocess (with every unparsed source an error) so that its
warnings never write over the terminal the TUI draws on, and a broken file becomes one
``InventoryError`` whose message the UI shows. A host's agent is at its ``pi_agent_url`` when
the inventory sets one, else ``https://<ansible_host or name>:<pi_agent_port>`` (``http`` where
the inventory opts out of TLS with ``pi_agent_tls: false``), the port defaulting to the agent's
own (``pi_agent/defaults.toml``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Groups that every inventory has; shown only through their members.
IMPLICIT_GROUPS = ("all", "ungrouped")


@functools.cache
def agent_port() -> int:
    """pi-agent's packaged default port (``agent.port`` in ``pi_agent/defaults.toml``)."""
    from pi_agent.config import DEFAULTS

    with DEFAULTS.open("rb") as handle:
        return int(tomllib.load(handle)["agent"]["port"])


class InventoryError(Exception):
    """An inventory that cannot be read; ``str()`` is one line, ``detail`` ansible's full text."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class Host:
    """One inventory host and where its agent listens."""

    name: str
    groups: tuple[str, ...]
    vars: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def agent_url(self) -> str:
        """The agent's base URL."""
        url = self.vars.get("pi_agent_url")
        if url:
            return str(url).rstrip("/")
        address = self.vars.get("ansible_host") or self.name
        port = self.vars.get("pi_agent_port") or agent_port()
        plain = str(self.vars.get("pi_agent_tls", True)).lower() in ("false", "no", "0", "off")
        return f"{'http' if plain else 'https'}://{address}:{port}"


@dataclass(frozen=True)
class Fleet:
    """Groups (name -> member hosts, children flattened) and hosts, in inventory order."""

    groups: dict[str, list[str]]
    hosts: dict[str, Host]
    sources: tuple[Path, ...] = ()


def _members(data: dict[str, Any], group: str, seen: set[str]) -> list[str]:
    if group in seen:  # a loop in children: ansible rejects it, but never recurse forever
        return []
    seen.add(group)
    entry = data.get(group) or {}
    hosts = list(entry.get("hosts") or [])
    for child in entry.get("children") or []:
        hosts += [h for h in _members(data, child, seen) if h not in hosts]
    return hosts


def parse_listing(data: dict[str, Any], sources: tuple[Path, ...] = ()) -> Fleet:
    """A ``Fleet`` from ``ansible-inventory --list`` JSON."""
    hostvars = (data.get("_meta") or {}).get("hostvars") or {}
    groups: dict[str, list[str]] = {}
    for name in data:
        if name == "_meta" or name in IMPLICIT_GROUPS:
            continue
        groups[name] = _members(data, name, set())
    ungrouped = (data.get("ungrouped") or {}).get("hosts") or []
    if ungrouped:
        groups["ungrouped"] = list(ungrouped)
    order = _members(data, "all", set()) or list(hostvars)
    hosts = {}
    for name in order:
        member_of = tuple(g for g, members in groups.items() if name in members)
        hosts[name] = Host(name, member_of, dict(hostvars.get(name) or {}))
    return Fleet(groups, hosts, sources)


def _summary(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("[ERROR]")]
    reasons = [
        line.split(": ", 2)[-1]
        for line in stderr.splitlines()
        if line.startswith("[WARNING]: Failed to parse")
    ]
    head = errors[0].removeprefix("[ERROR]: ") if errors else "ansible-inventory failed"
    return f"{head} ({reasons[0]})" if reasons else head


def load_inventory(sources: list[Path], cwd: Path | None = None, timeout: float = 60.0) -> Fleet:
    """Parse ``sources`` with ``ansible-inventory``; raises ``InventoryError`` on any failure.

    ``cwd`` is the project, so that its ``ansible.cfg`` applies as it does to the playbooks.
    """
    if not sources:
        raise InventoryError("no inventory given (use --inventory)")
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise InventoryError(f"inventory not found: {', '.join(missing)}")
    binary = Path(sys.executable).parent / "ansible-inventory"
    argv = [str(binary) if binary.exists() else "ansible-inventory", "--list"]
    for source in sources:
        argv += ["-i", str(source.resolve())]
    env = {
        **os.environ,
        "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "true",
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true",
        "ANSIBLE_NOCOLOR": "1",
    }
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=cwd
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InventoryError(f"cannot run ansible-inventory: {err}") from None
    if proc.returncode != 0:
        stderr = proc.stderr
        for source in sources:  # name each file as the user did, not as ansible resolved it
            stderr = stderr.replace(str(source.resolve()), str(source))
        raise InventoryError(_summary(stderr), stderr.strip())
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise InventoryError(f"ansible-inventory printed no JSON: {err.msg}") from None
    return parse_listing(data, tuple(sources))
