"""Every screen driven headless with Pilot; each wait is on a condition (``until``), no sleeps."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Checkbox, DataTable, Input, ProgressBar, RichLog, Select, Static

from distill import ops
from tui.agent import Tokens
from tui.app import FleetApp, main, parse_args, settings_from
from tui.screens.error import ErrorScreen
from tui.screens.help import HelpScreen
from tui.screens.pipeline import PipelineScreen
from tui.screens.run import RunScreen
from tui.settings import Settings
from tui.testing import FakeAgent, sample_bench, sample_status
from tui.widgets.run_table import RecapTable, RunTable

pytestmark = pytest.mark.anyio
SIZE = (140, 40)
Until = Callable[..., Any]


def settings(project: Path, **changes: Any) -> Settings:
    """The sample project with polling off unless a test turns it on."""
    base = Settings(
        project_dir=project,
        inventory=(project / "inventory.yml",),
        report=project / "reports" / "fleet-report.csv",
        refresh_s=3600,
        poll_agents=False,
    )
    return Settings(**{**base.__dict__, **changes})


# fleet


async def test_fleet_shows_groups_hosts_and_live_agent_status(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    with (
        FakeAgent(sample_status("pi-a", 55.0), "t", bench=sample_bench(24.0)) as up,
        FakeAgent(sample_status("pi-b", 85.0, throttled=0x4), "t", ready=False) as hot,
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
        async with app.run_test(size=SIZE) as pilot:
            fleet = app.get_screen("fleet")
            await until(pilot, lambda: fleet.polls >= 1)
            table = fleet.query_one("#hosts", DataTable)
            assert [str(k.value) for k in table.rows] == ["pi-a", "pi-b", "pi-c"]
            assert str(table.get_cell("pi-a", "ready")) == "ready"
            assert str(table.get_cell("pi-a", "tg")) == "24.0"
            assert str(table.get_cell("pi-a", "model")) == "quebecois-135m"
            assert str(table.get_cell("pi-b", "ready")) == "not ready"
            assert str(table.get_cell("pi-b", "throttling")) == "throttled"
            assert str(table.get_cell("pi-b", "temp")) == "85°C"
            assert str(table.get_cell("pi-c", "ready")) == "down"
            assert "unreachable" in str(table.get_cell("pi-c", "agent"))
            assert "2 up, 1 down" in str(fleet.query_one("#fleet-status", Static).render())
            assert app.errors == []  # a down agent is a row's state, not an error


async def test_selected_hosts_become_the_run_limit(project: Path, until: Until) -> None:
    app = FleetApp(settings(project))
    async with app.run_test(size=SIZE) as pilot:
        fleet = app.get_screen("fleet")
        await until(pilot, lambda: fleet.fleet is not None)
        await pilot.press("space", "down", "space")
        assert fleet.selected == {"localhost", "ctl-two"}
        await pilot.press("a")  # all selected already: none
        assert fleet.selected == set()
        await pilot.press("l")  # nothing selected: a warning, no switch
        assert isinstance(app.screen, type(fleet))
        await pilot.press("down", "space", "l")
        await until(pilot, lambda: isinstance(app.screen, RunScreen))
        limit = app.screen.query_one("#limit", Input)
        await until(pilot, lambda: limit.value == "ctl-two")


async def test_an_unreadable_inventory_opens_the_error_screen(
    broken: Path, project: Path, until: Until
) -> None:
    app = FleetApp(settings(project, inventory=(broken,)))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen))
        assert "broken.yml" in app.screen.message
        assert app.errors and app.errors[0].startswith("Cannot read the inventory")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ErrorScreen))
        assert app.get_screen("fleet").fleet is None  # still running, just empty


# run


async def test_replay_fills_one_row_per_task_and_host(
    fixtures: Path, project: Path, until: Until
) -> None:
    app = FleetApp(settings(project, replay=fixtures / "events" / "local.jsonl"))
    async with app.run_test(size=SIZE) as pilot:
        run = app.get_screen("run")
        assert isinstance(run, RunScreen)
        await until(pilot, lambda: run.finished is not None)
        table = run.query_one(RunTable)
        assert table.row_count == 10  # 5 tasks x 2 hosts
        assert table.status_of("Reach the host", "localhost") == "ok"
        assert table.status_of("Make a scratch file", "ctl-two") == "changed"
        assert table.status_of("Skip a step that only runs on Pis", "localhost") == "skipped"
        assert table.status_of("Fail on purpose and carry on", "ctl-two") == "ignored"
        recap = run.query_one(RecapTable).recap
        assert recap["localhost"]["ok"] == 4 and recap["ctl-two"]["changed"] == 1
        assert run.finished.status == "successful"
        assert run.query_one("#run-log", RichLog).lines  # the events' own output
        assert app.errors == []


async def test_a_failed_replay_reports_the_failing_host(
    fixtures: Path, project: Path, until: Until
) -> None:
    app = FleetApp(settings(project, replay=fixtures / "events" / "unreachable.jsonl"))
    async with app.run_test(size=SIZE) as pilot:
        run = app.get_screen("run")
        await until(pilot, lambda: run.finished is not None)
        assert run.query_one(RunTable).status_of("Reach the host", "ghost-pi") == "unreachable"
        assert run.query_one(RecapTable).recap["ghost-pi"]["unreachable"] == 1
        assert "failed on ghost-pi" in str(run.query_one("#run-status", Static).render())
        assert any("failed on ghost-pi" in e for e in app.errors)


async def test_unknown_events_are_logged_and_dropped(
    tmp_path: Path, fixtures: Path, project: Path, until: Until
) -> None:
    stream = tmp_path / "events.jsonl"
    lines = (fixtures / "events" / "local.jsonl").read_text().splitlines(keepends=True)
    stream.write_text(lines[0] + '{"event": "runner_on_teleport", "event_data": {}}\n' + lines[-1])
    app = FleetApp(settings(project, replay=stream))
    async with app.run_test(size=SIZE) as pilot:
        run = app.get_screen("run")
        await until(pilot, lambda: run.finished is not None)
        assert run.dropped == {"runner_on_teleport": 1}
        assert run.query_one(RunTable).row_count == 0
        assert "1 unknown event(s) dropped" in str(run.query_one("#run-status", Static).render())


async def test_a_torn_saved_run_is_an_error_not_a_crash(
    tmp_path: Path, project: Path, until: Until
) -> None:
    stream = tmp_path / "events.jsonl"
    stream.write_text('{"event": "playbook_on_start"}\n{"event": \n')
    app = FleetApp(settings(project, replay=stream))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen))
        assert "events.jsonl:2" in app.screen.message


@pytest.mark.parametrize(
    ("extra_vars", "error"),
    [("[1, 2]", "extra vars: expected a mapping"), ("a=", "")],
    ids=["a list is not extra vars", "an empty value is fine (no launch error)"],
)
async def test_bad_run_form_values_are_notifications(
    project: Path, until: Until, extra_vars: str, error: str
) -> None:
    app = FleetApp(settings(project), mode="run")
    async with app.run_test(size=SIZE) as pilot:
        run = app.get_screen("run")
        assert isinstance(run, RunScreen)
        await until(pilot, lambda: app.screen is run)
        run.query_one("#extra-vars", Input).value = extra_vars
        if error:
            await pilot.press("ctrl+r")
            assert app.errors and error in app.errors[-1]
            assert run.playbook_run is None
        else:
            assert run.request().extra_vars == {"a": ""}


async def test_no_playbook_and_no_inventory_are_explained(tmp_path: Path, until: Until) -> None:
    app = FleetApp(Settings(project_dir=tmp_path, poll_agents=False), mode="run")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunScreen))
        await pilot.press("ctrl+r")
        assert app.errors[-1] == "Cannot run: choose a playbook first"
        await pilot.press("ctrl+x")  # nothing to cancel: no error, no crash
        assert len(app.errors) == 1


async def test_saved_runs_can_be_chosen_and_replayed(
    fixtures: Path, project: Path, until: Until
) -> None:
    saved = project / "runs" / "tui" / "20260101T000000Z"
    saved.mkdir(parents=True)
    (saved / "events.jsonl").write_bytes((fixtures / "events" / "local.jsonl").read_bytes())
    app = FleetApp(settings(project), mode="run")
    async with app.run_test(size=SIZE) as pilot:
        run = app.get_screen("run")
        await until(pilot, lambda: app.screen is run)
        await pilot.press("ctrl+o")  # none chosen yet
        assert run.finished is None
        run.query_one("#saved-runs", Select).value = str(saved / "events.jsonl")
        await pilot.press("ctrl+o")
        await until(pilot, lambda: run.finished is not None)
        assert run.query_one(RunTable).row_count == 10


# pipeline


async def test_pipeline_forms_mirror_the_stage_flags(project: Path, until: Until) -> None:
    app = FleetApp(settings(project), mode="pipeline")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.get_screen("pipeline")
        assert isinstance(screen, PipelineScreen)
        await until(pilot, lambda: app.screen is screen)
        assert screen.stage == "label"
        required = [w.id for w in screen.query(".field.required")]
        assert "f-label-input" in required and "f-label-output" in required
        assert screen.query_one("#f-label-hf_token", Input).password  # secrets are masked
        assert isinstance(screen.query_one("#f-label-prompt_style"), Select)
        assert isinstance(screen.query_one("#f-label-skip_existing"), Checkbox)

        await pilot.press("ctrl+e")  # required fields empty: an error, highlighted
        assert "missing required field(s): input, output" in app.errors[-1]
        assert screen.query_one("#f-label-input").has_class("missing")

        screen.query_one("#f-label-input", Input).value = "dataset/in.jsonl"
        screen.query_one("#f-label-output", Input).value = "runs/out.jsonl"
        screen.query_one("#f-label-batch_size", Input).value = "0"
        await pilot.press("ctrl+e")  # the stage's own check refuses a zero batch
        assert app.errors[-1].startswith("label: bad values: label:")
        assert not screen.query_one("#f-label-input").has_class("missing")

        screen.query_one("#f-label-batch_size", Input).value = "8"
        screen.query_one("#f-label-skip_existing", Checkbox).value = True
        await pilot.press("ctrl+e")
        shown = str(screen.query_one("#command", Static).render())
        assert shown.endswith(
            "label --input dataset/in.jsonl --output runs/out.jsonl --batch-size 8 --skip-existing"
        )


async def test_a_stage_whose_module_is_missing_shows_as_unavailable(
    project: Path, until: Until, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ops.STAGES, "quantum", ("distill.quantum", "QuantumArgs"))
    app = FleetApp(settings(project), mode="pipeline")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.get_screen("pipeline")
        await until(pilot, lambda: app.screen is screen)
        assert "quantum" in screen.unavailable
        assert "not available" in str(screen.query_one(".unavailable", Static).render())


async def test_a_stage_runs_with_live_log_and_progress(
    project: Path, until: Until, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real `distill label` needs a model; this child prints what it prints (tqdm on stderr).
    script = (
        "import sys\n"
        "for n in (10, 60, 100):\n"
        "    sys.stderr.write(f'\\rlabel: {n}%|#| {n}/100 [00:01<00:00]'); sys.stderr.flush()\n"
        "print('{\"labelled\": 100}')\n"
    )
    monkeypatch.setattr(
        PipelineScreen, "command", lambda self, stage: ops.Command([sys.executable, "-c", script])
    )
    app = FleetApp(settings(project), mode="pipeline")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.get_screen("pipeline")
        await until(pilot, lambda: app.screen is screen)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.returncode is not None)
        assert screen.returncode == 0
        assert screen.query_one("#progress", ProgressBar).progress == 100
        log = screen.query_one("#pipeline-log", RichLog)
        assert any('{"labelled": 100}' in line.text for line in log.lines)


async def test_a_failing_stage_is_an_error_notification(
    project: Path, until: Until, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = ops.Command([sys.executable, "-c", "import sys; sys.exit('no teacher here')"])
    monkeypatch.setattr(PipelineScreen, "command", lambda self, stage: command)
    app = FleetApp(settings(project), mode="pipeline")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.get_screen("pipeline")
        await until(pilot, lambda: app.screen is screen)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.returncode is not None)
        assert screen.returncode == 1
        assert "exit code 1" in app.errors[-1]


# bench


async def test_bench_highlights_hosts_below_expected(project: Path, until: Until) -> None:
    app = FleetApp(settings(project), mode="bench")
    async with app.run_test(size=SIZE) as pilot:
        bench = app.get_screen("bench")
        await until(pilot, lambda: app.screen is bench and bench.rows)
        table = bench.query_one("#bench-table", DataTable)
        assert table.row_count == 4
        styles = {str(row[0]): row[0].style for row in (table.get_row_at(i) for i in range(4))}
        assert styles["pi-b"] == "bold red" and styles["pi-d"] == "bold red"
        assert styles["pi-a"] == ""
        assert "below expected: pi-b, pi-d" in str(bench.query_one("#bench-status").render())


async def test_bench_without_a_report_says_how_to_get_one(tmp_path: Path, until: Until) -> None:
    app = FleetApp(Settings(project_dir=tmp_path, poll_agents=False), mode="bench")
    async with app.run_test(size=SIZE) as pilot:
        bench = app.get_screen("bench")
        await until(pilot, lambda: app.screen is bench)
        status = str(bench.query_one("#bench-status").render())
        assert "no fleet report at results/fleet-report.csv" in status
        assert app.errors == []


async def test_a_bad_report_is_an_error_notification(tmp_path: Path, until: Until) -> None:
    report = tmp_path / "report.csv"
    report.write_text("host,board\n")
    app = FleetApp(Settings(project_dir=tmp_path, report=report, poll_agents=False), mode="bench")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(app.errors))
        assert "missing column(s)" in app.errors[0]


# help, keys, command line


async def test_help_lists_every_screen_and_closes(project: Path, until: Until) -> None:
    app = FleetApp(settings(project))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "f1")  # from any screen
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        sections = app.screen.sections
        assert set(sections) == {"Everywhere", "Fleet", "Run", "Pipeline", "Bench", "Chat"}
        assert ("ctrl+x", "Cancel") in sections["Run"]
        assert ("esc", "Stop answers") in sections["Chat"]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen))


def test_command_line_options(tmp_path: Path) -> None:
    args = parse_args(
        ["-i", "a.yml", "-i", "b.yml", "--project-dir", str(tmp_path), "--token-dir", "tok",
         "--ca-file", "ca.pem"]
    )  # fmt: skip
    conf = settings_from(args)
    assert conf.inventory == (Path.cwd() / "a.yml", Path.cwd() / "b.yml")
    assert conf.project_dir == tmp_path.resolve()
    assert conf.tokens.token_dir == Path.cwd() / "tok"
    assert conf.agent_ca() == Path.cwd() / "ca.pem"
    assert conf.report_path == tmp_path.resolve() / "results" / "fleet-report.csv"


def test_the_fleet_ca_is_found_in_the_cache_when_no_ca_file_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIDISTILL_CACHE_DIR", raising=False)
    conf = Settings(project_dir=tmp_path)
    assert conf.agent_ca() is None  # no fleet CA yet: the system's CAs
    ca = tmp_path / ".cache" / "fleet" / "ca" / "ca.pem"
    ca.parent.mkdir(parents=True)
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert conf.agent_ca() == ca
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert conf.agent_ca() is None  # the cache the roles use, not the project's


def test_main_refuses_a_missing_project_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--project-dir", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
