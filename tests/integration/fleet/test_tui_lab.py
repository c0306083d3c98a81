"""The dashboard against the lab: the run screen drives a real playbook (the agents' provisioning,
HTTPS certificates from the fleet's CA included) and its per-host rows reach ok/changed; the fleet
screen then polls every agent over HTTPS, verified against the fleet's CA, and a dashboard that
trusts another CA is refused by every agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT, foreign_ca
from fleet_helpers import run as run_command
from textual.widgets import Input, Select

from tui.agent import Tokens
from tui.app import FleetApp
from tui.screens.fleet import FleetScreen
from tui.screens.run import RunScreen
from tui.settings import Settings
from tui.testing import until
from tui.widgets.run_table import RecapTable, RunTable

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    """Textual runs on asyncio."""
    return "asyncio"


def lab_hosts(inventory: Path) -> list[str]:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-inventory")), "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(json.loads(out.stdout)["_meta"]["hostvars"])


async def test_the_run_screen_provisions_the_lab(lab: Path, tmp_path: Path) -> None:
    # Bring the lab up when this module runs alone (a no-op when it is up: the lab_down test
    # runs last). The agents (not zram, llama.cpp) are provisioned: the fleet
    # screen's test below polls them.
    run_command([sys.executable, str(LAB), "up", "--hosts", "3"], timeout=600)
    hosts = lab_hosts(lab)
    assert len(hosts) >= 2
    settings = Settings(project_dir=ROOT, inventory=(lab,), poll_agents=False)
    app = FleetApp(settings, mode="run")
    async with app.run_test(size=(160, 48)) as pilot:
        run = app.get_screen("run")
        assert isinstance(run, RunScreen)
        await until(pilot, lambda: app.screen is run, timeout=20)
        run.query_one("#playbook").value = str(ROOT / "playbooks" / "provision.yml")
        run.query_one("#tags", Input).value = "pi_agent"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: run.finished is not None, timeout=600)
        assert run.finished.status == "successful", app.errors
        table = run.query_one(RunTable)
        for host in hosts:
            statuses = {status for (task, name), status in table.statuses.items() if name == host}
            assert statuses, f"no rows for {host}"
            assert statuses <= {"ok", "changed", "skipped"}, (host, statuses)
            assert "ok" in statuses or "changed" in statuses
        recap = run.query_one(RecapTable).recap
        for host in hosts:
            assert recap[host].get("failures", 0) == 0
            assert recap[host].get("unreachable", 0) == 0


def poll_once(settings: Settings) -> FleetApp:
    return FleetApp(Settings(**{**settings.__dict__, "refresh_s": 0.0}), mode="fleet")


async def test_the_fleet_screen_polls_the_agents_over_https(lab: Path, tmp_path: Path) -> None:
    """Runs after the test above (the agents up). Each agent's status comes over HTTPS through
    the fleet's CA (found in the cache, as fleet-tui finds it); with another fleet's CA given as
    --ca-file, every agent is refused as untrusted."""
    hosts = lab_hosts(lab)
    cache = Path(os.environ.get("PIDISTILL_CACHE_DIR") or ROOT / ".cache")  # as the roles have it
    settings = Settings(project_dir=ROOT, inventory=(lab,),
                        tokens=Tokens(token_dir=cache / "fleet" / "tokens"))  # fmt: skip
    found = settings.agent_ca()
    assert found is not None and found.resolve() == (cache / "fleet" / "ca" / "ca.pem").resolve()
    app = poll_once(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = app.get_screen("fleet")
        assert isinstance(screen, FleetScreen)
        await until(pilot, lambda: screen.polls >= 1, timeout=120)
        updates = {name: screen.statuses[name] for name in hosts}
    assert {name: u.error for name, u in updates.items()} == dict.fromkeys(hosts, "")
    assert {name: u.status.host for name, u in updates.items()} == {name: name for name in hosts}

    app = poll_once(Settings(**{**settings.__dict__, "ca_file": foreign_ca(tmp_path)}))
    async with app.run_test(size=(160, 48)) as pilot:
        screen = app.get_screen("fleet")
        assert isinstance(screen, FleetScreen)
        await until(pilot, lambda: screen.polls >= 1, timeout=120)
        errors = {name: screen.statuses[name].error for name in hosts}
    assert all(e.startswith("certificate not trusted") for e in errors.values()), errors


async def test_the_chat_screen_talks_to_a_lab_pi(lab: Path, student_export: Path) -> None:
    """Runs after the tests above (the agents up). The Chat screen (F6) streams an answer from
    pi-1's agent over HTTPS, verified against the fleet's CA, and shows its tokens/s. pi-1 is
    given the student first (deploy.yml; no change when a full run already deployed it)."""
    from tui.screens.chat import ChatScreen

    playbook = str(Path(sys.executable).with_name("ansible-playbook"))
    deploy = [playbook, "playbooks/deploy.yml", "-i", str(lab), "--limit", "pi-1",
              "-e", f"fleet_model_dir={student_export}"]  # fmt: skip
    run_command(deploy, timeout=900)
    cache = Path(os.environ.get("PIDISTILL_CACHE_DIR") or ROOT / ".cache")
    settings = Settings(project_dir=ROOT, inventory=(lab,), poll_agents=False,
                        tokens=Tokens(token_dir=cache / "fleet" / "tokens"))  # fmt: skip
    app = FleetApp(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("f6")
        chat = app.get_screen("chat")
        assert isinstance(chat, ChatScreen)
        await until(pilot, lambda: chat.fleet is not None, timeout=60)
        chat.query_one("#chat-target", Select).value = "host:pi-1"
        await pilot.pause()
        assert chat.targets() == ["pi-1"]
        chat.ask("Salut! Comment ça va?")
        done = lambda: not chat.busy and "pi-1" in {*chat.stats, *chat.errors}  # noqa: E731
        await until(pilot, done, timeout=300)
        assert chat.errors == {}
        assert chat.answers["pi-1"].strip()
        assert chat.stats["pi-1"].completion_tokens > 0 and chat.stats["pi-1"].tokens_per_s > 0
        assert app.errors == []
