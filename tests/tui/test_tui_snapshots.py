"""Snapshot tests (pytest-textual-snapshot): each screen as an SVG, driven by recorded streams.

The run screen replays ``fixtures/events/*.jsonl`` (recorded for real by ``fixtures/record.py``),
so a change in how events become rows shows up as a snapshot diff. Refresh after a deliberate
change with ``pytest tests/tui --snapshot-update`` and look at the SVGs before committing.
Nothing on screen depends on where the checkout lives or on the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tui.agent import Tokens
from tui.app import FleetApp
from tui.screens.error import ErrorScreen
from tui.screens.help import HelpScreen
from tui.settings import Settings
from tui.testing import BROKEN_INVENTORY, FakeAgent, sample_bench, sample_status

pytest.importorskip("pytest_textual_snapshot")

SIZE = (140, 40)
Until = Callable[..., Any]


def settings(project: Path, **changes: Any) -> Settings:
    base = Settings(
        project_dir=project,
        inventory=(project / "inventory.yml",),
        report=project / "reports" / "fleet-report.csv",
        refresh_s=3600,
        poll_agents=False,
    )
    return Settings(**{**base.__dict__, **changes})


@pytest.mark.parametrize("recording", ["local", "unreachable"])
def test_run_screen_replaying_a_recorded_run(
    snap_compare: Any, fixtures: Path, project: Path, until: Until, recording: str
) -> None:
    app = FleetApp(settings(project, replay=fixtures / "events" / f"{recording}.jsonl"))

    async def finished(pilot: Any) -> None:
        run = app.get_screen("run")
        await until(pilot, lambda: run.finished is not None)

    assert snap_compare(app, terminal_size=SIZE, run_before=finished)


def test_fleet_screen_with_live_agents(
    snap_compare: Any, tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    with (
        FakeAgent(sample_status("pi-a", 51.0), "t", bench=sample_bench(24.1)) as up,
        FakeAgent(sample_status("pi-b", 83.5, throttled=0x50004), "t", ready=False) as hot,
    ):
        inventory = tmp_path / "fleet.yml"
        inventory.write_text(
            "pi5:\n  hosts:\n"
            f"    pi-a: {{pi_agent_url: '{up.url}'}}\n"
            f"    pi-b: {{pi_agent_url: '{hot.url}'}}\n"
            "pi4:\n  hosts:\n    pi-c: {ansible_host: 127.0.0.1, pi_agent_port: 1}\n"
        )
        conf = settings(
            project, inventory=(inventory,), tokens=Tokens(token_file=token), poll_agents=True
        )
        app = FleetApp(conf)

        async def polled(pilot: Any) -> None:
            fleet = app.get_screen("fleet")
            await until(pilot, lambda: fleet.polls >= 1)
            await pilot.press("space")

        assert snap_compare(app, terminal_size=SIZE, run_before=polled)


def test_pipeline_screen_highlights_missing_required_flags(
    snap_compare: Any, project: Path, until: Until
) -> None:
    app = FleetApp(settings(project), mode="pipeline")

    async def tried(pilot: Any) -> None:
        await until(pilot, lambda: app.screen.id == "pipeline")
        await pilot.press("ctrl+e")
        await until(pilot, lambda: bool(app.errors))

    assert snap_compare(app, terminal_size=SIZE, run_before=tried)


def test_bench_screen(snap_compare: Any, project: Path, until: Until) -> None:
    pytest.importorskip("textual_plotext")  # the fallback chart draws differently
    app = FleetApp(settings(project), mode="bench")

    async def loaded(pilot: Any) -> None:
        await until(pilot, lambda: bool(app.get_screen("bench").rows))

    assert snap_compare(app, terminal_size=SIZE, run_before=loaded)


def test_help_screen(snap_compare: Any, project: Path, until: Until) -> None:
    app = FleetApp(settings(project), mode="bench")

    async def opened(pilot: Any) -> None:
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))

    assert snap_compare(app, terminal_size=SIZE, run_before=opened)


def test_error_screen_for_a_broken_inventory(
    snap_compare: Any, tmp_path: Path, project: Path, until: Until, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken.yml").write_text(BROKEN_INVENTORY)
    monkeypatch.chdir(tmp_path)  # the message names the file as given: no absolute path on screen
    app = FleetApp(settings(project, inventory=(Path("broken.yml"),)))

    async def failed(pilot: Any) -> None:
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen))

    assert snap_compare(app, terminal_size=SIZE, run_before=failed)
