"""The dashboard drives a real playbook against the lab: per-host rows reach ok/changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT
from fleet_helpers import run as run_command
from textual.widgets import Input

from tui.app import FleetApp
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
    # test_lab.py ends by taking the lab down: bring it (back) up, a no-op when it is up.
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
        run.query_one("#tags", Input).value = "zram"
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
