"""A real playbook run through the TUI: ansible-runner, connection local, rows reach ok/changed.

The lab fleet (stand-in Pis over SSH) comes with the fleet playbooks; until then the playbook is
``fixtures/project/playbooks/local.yml`` against two hosts that are this machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Checkbox, Input

from tui.app import FleetApp
from tui.runner import find_runs, read_events, run_processes
from tui.screens.run import RunScreen
from tui.settings import Settings
from tui.widgets.run_table import RecapTable, RunTable

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_real_run_reaches_ok_and_changed_then_replays_the_same(
    project: Path, until: Callable[..., Any]
) -> None:
    conf = Settings(project_dir=project, inventory=(project / "inventory.yml",), poll_agents=False)
    app = FleetApp(conf, mode="run")
    async with app.run_test(size=(140, 40)) as pilot:
        run = app.get_screen("run")
        assert isinstance(run, RunScreen)
        await until(pilot, lambda: app.screen is run)
        run.query_one("#limit", Input).value = "localhost,ctl-two"
        await pilot.press("ctrl+r", "f5")  # look elsewhere while it runs: events still land
        await until(pilot, lambda: run.finished is not None, timeout=180)
        await pilot.press("f3")
        assert run.finished.status == "successful", app.errors
        table = run.query_one(RunTable)
        live = dict(table.statuses)
        for host in ("localhost", "ctl-two"):
            assert table.status_of("Reach the host", host) == "ok"
            assert table.status_of("Make a scratch file", host) == "changed"
        assert run.query_one(RecapTable).recap["localhost"]["changed"] == 1

        # the stream was saved under runs/tui/<time>/ and replays to the same rows
        saved = find_runs(project / "runs" / "tui")
        assert len(saved) == 1
        names = {e["event"] for e in read_events(saved[0])}
        assert {"runner_on_start", "runner_on_ok", "playbook_on_stats"} <= names
        run.start_replay(saved[0])
        await until(pilot, lambda: run.finished is not None)
        assert table.statuses == live

        # check mode goes through too (the command task is skipped, as ansible does)
        run.query_one("#check", Checkbox).value = True
        await pilot.press("ctrl+r")
        await until(pilot, lambda: run.finished is not None, timeout=180)
        assert run.finished.status == "successful"
        assert table.status_of("Make a scratch file", "localhost") == "skipped"


async def test_cancel_stops_a_running_playbook(project: Path, until: Callable[..., Any]) -> None:
    conf = Settings(project_dir=project, inventory=(project / "inventory.yml",), poll_agents=False)
    app = FleetApp(conf, mode="run")
    async with app.run_test(size=(140, 40)) as pilot:
        run = app.get_screen("run")
        assert isinstance(run, RunScreen)
        await until(pilot, lambda: app.screen is run)
        run.query_one("#playbook").value = str(project / "playbooks" / "slow.yml")
        await pilot.press("ctrl+r")
        table = run.query_one(RunTable)
        await until(pilot, lambda: "started" in table.statuses.values(), timeout=120)
        await pilot.press("ctrl+x")
        await until(pilot, lambda: run.finished is not None, timeout=60)
        assert run.finished.status == "canceled"
        assert any("canceled" in e for e in app.errors)
        # ansible's workers (own sessions) and the module they started are gone too
        await until(pilot, lambda: not run_processes("sleep 97"), timeout=10)

        # quitting mid-run cancels too, instead of leaving ansible running behind the terminal
        await pilot.press("ctrl+r")
        await until(pilot, lambda: "started" in table.statuses.values(), timeout=120)
    assert run.playbook_run is not None and not run.playbook_run.running
    assert not run_processes("sleep 97")
