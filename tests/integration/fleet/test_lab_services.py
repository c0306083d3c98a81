"""The fleet as one service, on the lab: site.yml with the `gateway` and `monitoring` groups
(inventory/lab-services.yml: both on pi-1) brings up HAProxy and Prometheus; completions go
through the gateway while a board is killed and while a rollout switches every board, and the
failed client requests are counted (goal: none); Prometheus sees every agent up and fires its
alert when one agent stops.

Runs last of the lab modules (``LAB_ORDER``): the services stay on pi-1 for the session. Each
test leaves every board serving the student it found there.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet_helpers import ROOT, make_export, recap, run, version_of
from lab_helpers import (
    FLEET_CA,
    HOSTS,
    PLAYBOOK,
    active_version,
    fleet_tls,
    lab_hosts,
    on_board,
    site,
)

from tui.gateway import Gateway

pytestmark = pytest.mark.slow

SERVICES = ROOT / "inventory" / "lab-services.yml"
GATEWAY_PORT = 8443
PROMETHEUS_PORT = 9090
CLIENT_TOKEN = ROOT / ".cache" / "fleet" / "gateway" / "clients" / "default"
SERVICE_TOKEN = ROOT / ".cache" / "fleet" / "service-token"
# What a client asks: short answers, so that a run holds many requests.
REQUEST = {"messages": [{"role": "user", "content": "Allô, ça va?"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def up(lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site.yml with the services' groups: the boards provisioned (already, after the lab
    modules before this one), the gateway and Prometheus on pi-1, the student deployed and
    benchmarked; the inventory."""
    results = tmp_path_factory.mktemp("services-bench")
    done = run(site(lab, student_export, results, "-i", str(SERVICES)), timeout=1800)
    counts = recap(done.stdout)
    assert {h: c["failed"] for h, c in counts.items()} == dict.fromkeys(HOSTS, 0), counts
    assert (
        "Set up the fleet's gateway" in done.stdout
        and "Set up the fleet's monitoring" in done.stdout
    )
    return lab


def gateway_url(inventory: Path) -> str:
    return f"https://{lab_hosts(inventory)['pi-1']['ansible_host']}:{GATEWAY_PORT}"


def prometheus(inventory: Path, path: str, **query: str) -> dict:
    address = lab_hosts(inventory)["pi-1"]["ansible_host"]
    url = f"http://{address}:{PROMETHEUS_PORT}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["data"]


@dataclass
class Load:
    """Clients sending completions through the gateway until stopped; what they got."""

    url: str
    clients: int = 4
    token_file: Path = CLIENT_TOKEN
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.context = fleet_tls()
        self.token = self.token_file.read_text().strip()
        self.threads = [threading.Thread(target=self._client) for _ in range(self.clients)]

    def _client(self) -> None:
        body = json.dumps(REQUEST).encode()
        while not self._stop.is_set():
            request = urllib.request.Request(
                self.url + "/v1/chat/completions", data=body, method="POST",
                headers={"Authorization": f"Bearer {self.token}",
                         "Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=120, context=self.context) as resp:
                    answer = json.loads(resp.read())
                    assert answer["choices"][0]["message"]["content"] is not None
                    self.statuses[resp.status] += 1
            except urllib.error.HTTPError as err:
                self.statuses[err.code] += 1
                self.errors.append(f"{err.code}: {err.read()[:200]!r}")
            except Exception as err:  # a reset, a timeout: a failed request all the same
                self.statuses["error"] += 1
                self.errors.append(repr(err))

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=180)
        self.seconds = time.monotonic() - self.started

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


def board_states(inventory: Path) -> dict[str, str]:
    """Each board's state at the gateway, from its stats CSV, as the TUI reads it."""
    token = CLIENT_TOKEN.read_text().strip()
    return Gateway("pi-1", gateway_url(inventory), token, FLEET_CA / "ca.pem").states(timeout=10)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(1)


def test_site_brings_up_the_gateway_and_every_board_is_up_behind_it(up: Path) -> None:
    wait_for(lambda: set(board_states(up).values()) == {"UP"}, 60, "every board UP")
    assert sorted(board_states(up)) == HOSTS
    # A second run changes nothing.
    again = [PLAYBOOK, "playbooks/services.yml", "-i", str(up), "-i", str(SERVICES)]
    done = run(again, timeout=900)
    assert recap(done.stdout)["pi-1"]["changed"] == 0, done.stdout[-3000:]


def test_a_client_without_the_gateway_s_token_is_refused(up: Path) -> None:
    context = fleet_tls()
    for header in ({}, {"Authorization": "Bearer " + (ROOT / ".cache/fleet/tokens/pi-1").read_text()
                        .strip()}):  # fmt: skip
        request = urllib.request.Request(gateway_url(up) + "/v1/models", headers=header)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10, context=context)
        assert err.value.code == 401


def test_completions_through_the_gateway_survive_a_killed_board(up: Path) -> None:
    with Load(gateway_url(up)) as load:
        time.sleep(10)
        # The board's agent and its llama-server die at once; systemd brings them back.
        on_board(up, "pi-3", "systemctl kill --signal=KILL pi-agent.service")
        wait_for(lambda: board_states(up)["pi-3"] != "UP", 60, "pi-3 seen down")
        wait_for(lambda: board_states(up)["pi-3"] == "UP", 180, "pi-3 back")
        time.sleep(5)
    print(f"killed board: {dict(load.statuses)} in {load.seconds:.0f} s")
    assert load.statuses[200] > 20, load.statuses
    assert load.failed == 0, (load.statuses, load.errors[:5])


def test_a_rolling_update_through_the_gateway_fails_no_request(
    up: Path, student_export: Path, tmp_path: Path
) -> None:
    weights = next(student_export.glob("*.gguf")).read_bytes()
    other = make_export(tmp_path / "dist", weights, name="rolled")
    deploy = [PLAYBOOK, "playbooks/deploy.yml", "-i", str(up), "-i", str(SERVICES),
              "-e", f"fleet_model_dir={other}", "-e", "fleet_canary_gate=false"]  # fmt: skip
    with Load(gateway_url(up)) as load:
        done = run(deploy, timeout=1200)
    print(f"rollout: {dict(load.statuses)} in {load.seconds:.0f} s")
    assert "Mark the board draining at the gateway" in done.stdout
    assert {h: active_version(up, h) for h in HOSTS} == dict.fromkeys(HOSTS, version_of(other))
    assert load.statuses[200] > 10, load.statuses
    assert load.failed == 0, (load.statuses, load.errors[:5])
    wait_for(lambda: set(board_states(up).values()) == {"UP"}, 60, "every board back UP")
    run([*deploy[:-4], "-e", f"fleet_model_dir={student_export}", "-e", "fleet_canary_gate=false"])
    assert {h: active_version(up, h) for h in HOSTS} == dict.fromkeys(
        HOSTS, version_of(student_export)
    )


def test_completions_per_second_through_the_gateway_and_on_one_board(up: Path) -> None:
    """A measurement, printed (the lab's boards share the workstation's cores, so the gateway
    cannot multiply the throughput here as it does over real boards): what matters is that every
    request through the gateway is answered."""
    board = lab_hosts(up)["pi-2"]["pi_agent_url"]
    with Load(board, clients=2, token_file=SERVICE_TOKEN) as direct:
        time.sleep(15)
    with Load(gateway_url(up), clients=6) as through:
        time.sleep(15)
    for name, load in (("pi-2 directly, 2 clients", direct), ("gateway, 6 clients", through)):
        print(f"{name}: {load.statuses[200] / load.seconds:.2f} completions/s "
              f"({dict(load.statuses)} in {load.seconds:.0f} s)")  # fmt: skip
    assert direct.failed == 0 and through.failed == 0, (direct.errors[:3], through.errors[:3])
    assert direct.statuses[200] > 0 and through.statuses[200] > 0


def test_prometheus_sees_every_agent_up_and_alerts_when_one_stops(up: Path) -> None:
    def up_values() -> dict[str, str]:
        result = prometheus(up, "/api/v1/query", query='up{job="pi_agent"}')["result"]
        return {r["metric"]["instance"]: r["value"][1] for r in result}

    wait_for(lambda: up_values() == dict.fromkeys(HOSTS, "1"), 60, "every agent up")

    def firing() -> set[str]:
        alerts = prometheus(up, "/api/v1/alerts")["alerts"]
        down = [a for a in alerts if a["labels"]["alertname"] == "PiAgentDown"]
        return {a["labels"]["instance"] for a in down if a["state"] == "firing"}

    assert firing() == set()
    on_board(up, "pi-2", "systemctl stop pi-agent.service")
    try:
        wait_for(lambda: firing() == {"pi-2"}, 180, "PiAgentDown firing for pi-2")
    finally:
        on_board(up, "pi-2", "systemctl start pi-agent.service")
    wait_for(lambda: up_values() == dict.fromkeys(HOSTS, "1"), 120, "pi-2 up again")
    wait_for(lambda: firing() == set(), 120, "the alert resolved")
