"""The run screen: launch a playbook through ansible-runner and watch it per task and host.

The form (playbook, tags, limit, extra vars, check mode) builds a ``RunRequest``; the run's
thread posts ``RunnerEvent``\\s that this screen turns into table rows by event name, log lines
(the event's own ``stdout``) and, at ``playbook_on_stats``, the recap. Events it does not know
are logged and dropped. A saved run (``runs/tui/*/events.jsonl``) replays through the same path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    Footer,
    Header,
    Input,
    Label,
    RichLog,
    Select,
    Static,
)

from tui.messages import RunFinished, RunnerEvent
from tui.runner import (
    PlaybookRun,
    RunRequest,
    find_playbooks,
    find_runs,
    new_run_dir,
    parse_extra_vars,
    replay,
)
from tui.widgets.run_table import LOG_ONLY_EVENTS, RecapTable, RunTable

if TYPE_CHECKING:
    from tui.app import FleetApp

log = logging.getLogger(__name__)

FINISHED_STYLES = {"successful": "green", "failed": "bold red", "canceled": "yellow"}


class RunScreen(Screen[None]):
    """Form on the left; task/host table, recap and log on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "launch", "Run", priority=True),
        Binding("ctrl+x", "cancel_run", "Cancel", priority=True),
        Binding("ctrl+o", "replay", "Replay", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="run")
        self.playbook_run: PlaybookRun | None = None
        self.replaying = False
        self.finished: RunFinished | None = None
        self.dropped: dict[str, int] = {}
        self.events_seen = 0

    @property
    def fleet_app(self) -> FleetApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        settings = self.fleet_app.settings
        playbooks = find_playbooks(settings.project_dir)
        runs = find_runs(settings.runs_dir)
        yield Header()
        with Horizontal(id="run-body"):
            with Vertical(id="run-form"):
                yield Label("Playbook")
                yield Select(
                    [(p.stem, str(p)) for p in playbooks],
                    prompt="no playbooks/ yet" if not playbooks else "choose a playbook",
                    id="playbook",
                    value=str(playbooks[0]) if playbooks else Select.NULL,
                )
                yield Label("Tags")
                yield Input(placeholder="zram,llama_cpp", id="tags")
                yield Label("Limit")
                yield Input(placeholder="pi5 or host1,host2", id="limit")
                yield Label("Extra vars")
                yield Input(placeholder="key=value or {key: value}", id="extra-vars")
                yield Checkbox("Check mode (--check)", id="check")
                with Horizontal(classes="buttons"):
                    yield Button("Run", id="launch", variant="primary")
                    yield Button("Cancel", id="cancel", variant="error", disabled=True)
                yield Label("Saved runs")
                yield Select(
                    [(p.parent.name, str(p)) for p in runs],
                    prompt="no saved runs" if not runs else "choose a run",
                    id="saved-runs",
                )
                yield Button("Replay", id="replay")
            with Vertical(id="run-main"):
                yield Static("no run yet", id="run-status", markup=False)
                yield RunTable(id="run-table")
                yield RecapTable(id="recap")
                yield RichLog(id="run-log", wrap=False, max_lines=5000)
        yield Footer()

    def on_mount(self) -> None:
        if self.fleet_app.settings.replay is not None:
            self.start_replay(self.fleet_app.settings.replay)

    # form

    def set_limit(self, limit: str) -> None:
        """Prefill the limit (the fleet screen's selection)."""
        self.query_one("#limit", Input).value = limit

    def request(self) -> RunRequest:
        """The form as a ``RunRequest``; ``ValueError`` with a message for the user."""
        settings = self.fleet_app.settings
        playbook = self.query_one("#playbook", Select).value
        if not isinstance(playbook, str):
            raise ValueError("choose a playbook first")
        inventory = settings.default_inventory()
        if not inventory:
            raise ValueError("no inventory: start fleet-tui with --inventory")
        return RunRequest(
            playbook=Path(playbook),
            inventory=list(inventory),
            project_dir=settings.project_dir,
            tags=self.query_one("#tags", Input).value.strip(),
            limit=self.query_one("#limit", Input).value.strip(),
            extra_vars=parse_extra_vars(self.query_one("#extra-vars", Input).value),
            check=self.query_one("#check", Checkbox).value,
        )

    @property
    def busy(self) -> bool:
        """A run is going on."""
        return self.playbook_run is not None and self.finished is None

    def _reset(self, title: str) -> None:
        self.query_one(RunTable).reset()
        self.query_one(RecapTable).reset()
        self.query_one("#run-log", RichLog).clear()
        self.finished = None
        self.dropped.clear()
        self.events_seen = 0
        self._status(title)

    def action_launch(self) -> None:
        if self.busy:
            self.notify("a run is already going on (ctrl+x cancels it)", severity="warning")
            return
        try:
            request = self.request()
            run_dir = new_run_dir(self.fleet_app.settings.runs_dir)
        except (ValueError, OSError) as err:
            self.notify(str(err), title="Cannot run", severity="error")
            return
        self._reset(f"running {request.playbook.name}…")
        self.query_one("#run-log", RichLog).write(Text("$ " + request.describe(), style="bold"))
        self.playbook_run = PlaybookRun(request, run_dir, self.post_message)
        self.query_one("#cancel", Button).disabled = False
        self.playbook_run.start()
        self.refresh_bindings()

    def action_cancel_run(self) -> None:
        if self.playbook_run is None or not self.busy:
            self.notify("nothing to cancel", severity="warning")
            return
        self.playbook_run.cancel()
        self._status("cancelling…")

    def action_replay(self) -> None:
        value = self.query_one("#saved-runs", Select).value
        if not isinstance(value, str):
            self.notify("choose a saved run to replay", severity="warning")
            return
        self.start_replay(Path(value))

    def start_replay(self, path: Path) -> None:
        """Replay a saved event stream through the same messages as a live run."""
        if self.busy:
            self.notify("wait for the run to end (or cancel it)", severity="warning")
            return
        self._reset(f"replaying {path.parent.name}/{path.name}")
        self.playbook_run = None
        self.replaying = True
        try:
            replay(path, self.post_message)
        except (OSError, ValueError) as err:
            self.replaying = False
            self.fleet_app.show_error("Cannot replay this run", str(err))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {"launch": self.action_launch, "cancel": self.action_cancel_run}
        actions.get(event.button.id or "", self.action_replay)()

    # events

    def on_runner_event(self, message: RunnerEvent) -> None:
        event = message.event
        name = str(event.get("event", ""))
        self.events_seen += 1
        stdout = event.get("stdout")
        if isinstance(stdout, str) and stdout.strip():
            text = stdout.replace("\r\n", "\n").replace("\r", "").strip("\n")
            self.query_one("#run-log", RichLog).write(Text.from_ansi(text))
        if name == "playbook_on_stats":
            self.query_one(RecapTable).show(event.get("event_data") or {})
        elif self.query_one(RunTable).apply(event) or name in LOG_ONLY_EVENTS:
            pass
        else:
            self.dropped[name] = self.dropped.get(name, 0) + 1
            log.warning("dropped unknown runner event %r", name)

    def on_run_finished(self, message: RunFinished) -> None:
        self.finished = message
        self.replaying = False
        self.query_one("#cancel", Button).disabled = True
        self.refresh_bindings()
        recap = self.query_one(RecapTable).recap
        bad = sorted(h for h, c in recap.items() if c.get("failures") or c.get("unreachable"))
        text = f"{message.status}" + (f" (rc {message.rc})" if message.rc is not None else "")
        if bad:
            text += f": failed on {', '.join(bad)}"
        if self.dropped:
            text += f"; {sum(self.dropped.values())} unknown event(s) dropped"
        self._status(text, FINISHED_STYLES.get(message.status, "bold red"))
        if message.error:
            self.fleet_app.show_error("The run could not start", message.error)
        elif message.status != "successful":
            self.notify(text, title="Playbook run", severity="error")
        self.refresh_saved_runs()

    def refresh_saved_runs(self) -> None:
        """Offer the runs saved so far."""
        runs = find_runs(self.fleet_app.settings.runs_dir)
        self.query_one("#saved-runs", Select).set_options([(p.parent.name, str(p)) for p in runs])

    def _status(self, text: str, style: str = "") -> None:
        self.query_one("#run-status", Static).update(Text(text, style=style))

    def check_action(self, action: str, parameters: tuple[Any, ...]) -> bool | None:
        if action == "cancel_run":
            return True if self.busy and self.playbook_run is not None else None
        return True
