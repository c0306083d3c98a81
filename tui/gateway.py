"""Each board's state at the fleet's gateway (the gateway role's HAProxy), for the fleet screen.

    gateway = find_gateway(fleet, project_dir)     # None without a host in the `gateway` group
    states = gateway.states()                      # {"pi-1": "UP", "pi-2": "DRAIN", ...}

The gateway serves HAProxy's statistics as CSV at ``/gateway/stats;csv`` behind a client token
of its own (``<cache>/fleet/gateway/clients/default``, made by the gateway role), over TLS
verified against the fleet's CA. A row per server of the boards' backend; its ``status`` column
is HAProxy's: ``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ``no check``, or a transition such as
``UP 1/2``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from distill.agent_client import AgentConnection, AgentError, fleet_dir
from tui.inventory import Fleet

STATS_PATH = "/gateway/stats;csv"
BACKEND = "pi_agents"
DEFAULT_PORT = 8443
CLIENT = "default"


def parse_stats_csv(text: str, backend: str = BACKEND) -> dict[str, str]:
    """Server name -> status of one backend, from HAProxy's ``show stat`` CSV (its header line
    starts with ``# ``); the backend's own summary rows are left out."""
    body = text.removeprefix("# ")
    rows = csv.DictReader(io.StringIO(body))
    if rows.fieldnames is None or not {"pxname", "svname", "status"} <= set(rows.fieldnames):
        raise AgentError("the gateway's statistics are not HAProxy's CSV")
    return {
        row["svname"]: row["status"]
        for row in rows
        if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
    }


@dataclass(frozen=True)
class Gateway:
    """The gateway's address, client token and trust."""

    host: str
    url: str
    token: str | None
    ca_file: Path | None = None

    def states(self, timeout: float = 5.0) -> dict[str, str]:
        """Every board's state at the gateway; AgentError with one line when it cannot say."""
        conn = AgentConnection(self.url, self.token, timeout=timeout, ca_file=self.ca_file)
        headers = {"Accept": "text/csv"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        with conn.client(headers) as client:
            response = conn.get(client, STATS_PATH)
            conn.check(response, STATS_PATH)
        return parse_stats_csv(response.text)


def find_gateway(fleet: Fleet, project_dir: Path | None, ca_file: Path | None) -> Gateway | None:
    """The first host of the inventory's ``gateway`` group as a :class:`Gateway`, or None. Its
    URL is the host's ``gateway_url``, else ``https://<ansible_host>:<gateway_port>``."""
    hosts = fleet.groups.get("gateway") or []
    if not hosts:
        return None
    host = fleet.hosts[hosts[0]]
    address = host.vars.get("ansible_host") or host.name
    port = host.vars.get("gateway_port") or DEFAULT_PORT
    url = str(host.vars.get("gateway_url") or f"https://{address}:{port}").rstrip("/")
    token_file = fleet_dir(project_dir) / "gateway" / "clients" / CLIENT
    try:
        token = token_file.read_text(encoding="utf-8").strip() or None
    except OSError:
        token = None
    return Gateway(host.name, url, token, ca_file)
