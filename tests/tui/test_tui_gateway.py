"""The fleet screen's Gateway column against a real HAProxy (Debian's, on 127.0.0.1) in front of
two stand-in agents: one ready (UP), one not (DOWN after its health checks), one host not behind
the gateway ("-"); a board drained through the admin socket reads DRAIN at the next poll."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static

from distill.llamacpp import free_port
from tui.agent import Tokens
from tui.app import FleetApp
from tui.gateway import Gateway, parse_stats_csv
from tui.settings import Settings
from tui.testing import FakeAgent, sample_status

CLIENT_TOKEN = "gateway-client-token-0123456789"

CONFIG = """\
global
    stats socket {admin} level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend clients
    bind 127.0.0.1:{port}
    http-request return status 401 unless {{ req.hdr(authorization) -m str "Bearer {client}" }}
    use_backend stats if {{ path_beg /gateway/stats }}
    default_backend pi_agents
backend stats
    stats enable
    stats uri /gateway/stats
backend pi_agents
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz hdr Authorization "Bearer t"
    http-check expect status 200
    server pi-a 127.0.0.1:{a} check inter 200ms fall 1 rise 1
    server pi-b 127.0.0.1:{b} check inter 200ms fall 1 rise 1
"""


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if found is None:
        pytest.fail("haproxy is missing: `make apt` installs Debian's haproxy package")
    return found


class HAProxy:
    """``haproxy -db`` on 127.0.0.1 with ``CONFIG``; its admin socket answers ``command``."""

    def __init__(self, base: Path, a: int, b: int) -> None:
        self.port = free_port()
        self.admin = base / "admin.sock"
        config = base / "haproxy.cfg"
        config.write_text(
            CONFIG.format(admin=self.admin, port=self.port, client=CLIENT_TOKEN, a=a, b=b)
        )
        check = subprocess.run([_haproxy(), "-c", "-f", str(config)], capture_output=True,
                               text=True, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([_haproxy(), "-db", "-f", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.admin.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            return b"".join(iter(lambda: sock.recv(4096), b"")).decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def port_of(agent: FakeAgent) -> int:
    return int(agent.url.rsplit(":", 1)[1])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[HAProxy, FakeAgent, FakeAgent]]:
    with (
        FakeAgent(sample_status("pi-a"), "t") as up,
        FakeAgent(sample_status("pi-b"), "t", ready=False) as not_ready,
    ):
        proxy = HAProxy(tmp_path, port_of(up), port_of(not_ready))
        try:
            yield proxy, up, not_ready
        finally:
            proxy.stop()


def wait_states(gw: Gateway, wanted: dict[str, str]) -> None:
    deadline = time.monotonic() + 15
    while (states := gw.states()) != wanted:
        assert time.monotonic() < deadline, states
        time.sleep(0.1)


def test_the_states_of_real_haproxy_and_a_drain(gateway) -> None:
    proxy, _, _ = gateway
    gw = Gateway("gw", proxy.url, CLIENT_TOKEN)
    wait_states(gw, {"pi-a": "UP", "pi-b": "DOWN"})
    proxy.command("set server pi_agents/pi-a state drain")
    wait_states(gw, {"pi-a": "DRAIN", "pi-b": "DOWN"})


def test_a_wrong_client_token_is_one_line(gateway) -> None:
    from tui.agent import AgentError

    proxy, _, _ = gateway
    with pytest.raises(AgentError, match="token refused \\(401"):
        Gateway("gw", proxy.url, "wrong").states()


def test_a_page_that_is_not_haproxy_s_csv_is_refused() -> None:
    from tui.agent import AgentError

    with pytest.raises(AgentError, match="not HAProxy's CSV"):
        parse_stats_csv("<html>proxy error</html>")


@pytest.mark.anyio
async def test_the_fleet_screen_shows_each_board_at_the_gateway(
    tmp_path: Path, project: Path, gateway, until, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, up, not_ready = gateway
    cache = tmp_path / "cache"
    (cache / "fleet" / "gateway" / "clients").mkdir(parents=True)
    (cache / "fleet" / "gateway" / "clients" / "default").write_text(CLIENT_TOKEN + "\n")
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(cache))
    token = tmp_path / "token"
    token.write_text("t\n")
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(
        "pis:\n  hosts:\n"
        f"    pi-a: {{pi_agent_url: '{up.url}'}}\n"
        f"    pi-b: {{pi_agent_url: '{not_ready.url}'}}\n"
        "    pi-c: {ansible_host: 127.0.0.1, pi_agent_port: 1}\n"
        f"gateway:\n  hosts:\n    pi-a: {{gateway_url: '{proxy.url}'}}\n"
    )
    wait_states(Gateway("gw", proxy.url, CLIENT_TOKEN), {"pi-a": "UP", "pi-b": "DOWN"})
    settings = Settings(project_dir=project, inventory=(inventory,), refresh_s=3600,
                        tokens=Tokens(token_file=token))  # fmt: skip
    app = FleetApp(settings)
    async with app.run_test(size=(160, 40)) as pilot:
        fleet = app.get_screen("fleet")
        await until(pilot, lambda: fleet.polls >= 1)
        table = fleet.query_one("#hosts", DataTable)
        cells = {h: str(table.get_cell(h, "gateway")) for h in ("pi-a", "pi-b", "pi-c")}
        assert cells == {"pi-a": "UP", "pi-b": "DOWN", "pi-c": "-"}
        assert "gateway: 1 of 2 boards UP" in str(fleet.query_one("#fleet-status", Static).render())
        proxy.command("set server pi_agents/pi-a state drain")
        fleet.poll()
        await until(pilot, lambda: str(table.get_cell("pi-a", "gateway")) == "DRAIN")
