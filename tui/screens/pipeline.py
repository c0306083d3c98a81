"""The pipeline screen: one form per distill stage, built from ``distill.ops.fields``.

Each flag becomes a widget by its type (checkbox, number, text, a select for choices, a
password box for secrets); required flags are marked and highlighted. ``ops.build`` validates
the values (the stage's own dataclass checks) before anything starts, so a bad value is one
notification. A stage whose module is missing shows as unavailable. The command runs in
threads (``tui.process``): its stderr streams to the log, tqdm bars drive the progress bar.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    Footer,
    Header,
    Input,
    ProgressBar,
    RichLog,
    Select,
    Static,
    TabbedContent,
    TabPane,
)

from distill import ops
from tui.forms import convert, default_text, parse_type
from tui.messages import ProcessExited, ProcessOutput, ProcessProgress
from tui.process import CommandRun

if TYPE_CHECKING:
    from tui.app import FleetApp


def _widget_id(stage: str, name: str) -> str:
    return f"f-{stage}-{name}"


def field_widget(stage: str, field: dict[str, Any]) -> Any:
    """The input widget for one flag."""
    wid = _widget_id(stage, field["name"])
    classes = "field required" if field["required"] else "field"
    kind = parse_type(str(field["type"]))
    if field.get("choices"):
        options = [(str(c), str(c)) for c in field["choices"]]
        default = field.get("default")
        return Select(
            options,
            id=wid,
            classes=classes,
            allow_blank=default is None,
            value=str(default) if default is not None else Select.NULL,
        )
    if kind.widget == "checkbox":
        return Checkbox(field["flag"], value=bool(field.get("default")), id=wid, classes=classes)
    input_type = {"integer": "integer", "number": "number"}.get(kind.widget, "text")
    return Input(
        placeholder=default_text(field) or ("required" if field["required"] else "(none)"),
        password=bool(field.get("secret")),
        type=input_type,
        id=wid,
        classes=classes,
    )


class PipelineScreen(Screen[None]):
    """A tab per stage; command preview, progress and log below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "launch", "Run stage", priority=True),
        Binding("ctrl+x", "cancel", "Cancel", priority=True),
        Binding("ctrl+e", "preview", "Show command", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="pipeline")
        self.fields: dict[str, list[dict[str, Any]]] = {}
        self.unavailable: dict[str, str] = {}
        self.process: CommandRun | None = None
        self.returncode: int | None = None
        for stage in ops.STAGES:
            try:
                self.fields[stage] = ops.fields(stage)
            except ops.OpError as err:
                self.unavailable[stage] = str(err)

    @property
    def fleet_app(self) -> FleetApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="pipeline-body"):
            with TabbedContent(id="stages"):
                for stage in ops.STAGES:
                    title = stage if stage in self.fields else f"{stage} (unavailable)"
                    with TabPane(title, id=f"stage-{stage}"):
                        if stage in self.unavailable:
                            yield Static(self.unavailable[stage], classes="unavailable")
                            continue
                        with VerticalScroll(classes="form"):
                            for field in self.fields[stage]:
                                with Horizontal(classes="row"):
                                    mark = " *" if field["required"] else ""
                                    yield Static(
                                        field["flag"] + mark,
                                        classes="flag required" if mark else "flag",
                                        markup=False,
                                    )
                                    yield field_widget(stage, field)
                                    yield Static(field["help"], classes="help", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Show command", id="preview")
                yield Button("Run", id="launch", variant="primary")
                yield Button("Cancel", id="cancel", variant="error")
            yield Static("", id="command", markup=False)
            yield ProgressBar(total=100, id="progress", show_eta=False)
            yield RichLog(id="pipeline-log", wrap=True, max_lines=5000)
        yield Footer()

    @property
    def stage(self) -> str:
        """The stage of the active tab."""
        active = self.query_one("#stages", TabbedContent).active
        return active.removeprefix("stage-")

    def values(self, stage: str) -> dict[str, Any]:
        """The form's values for ``stage``, converted; ``ValueError`` names a bad flag."""
        values = {}
        for field in self.fields[stage]:
            widget = self.query_one(f"#{_widget_id(stage, field['name'])}")
            raw = widget.value  # type: ignore[attr-defined]
            if isinstance(widget, Select) and not isinstance(raw, str):
                raw = None
            value = convert(field, raw)
            if value is not None:
                values[field["name"]] = value
        return values

    def command(self, stage: str) -> ops.Command:
        """The validated command for ``stage`` (``ops.OpError`` / ``ValueError`` when bad)."""
        if stage in self.unavailable:
            raise ops.OpError(self.unavailable[stage])
        distill = Path(sys.executable).with_name("distill")
        program = str(distill) if distill.exists() else "distill"
        return ops.build(stage, program=program, **self.values(stage))

    def _highlight_missing(self, stage: str) -> None:
        for field in self.fields.get(stage, []):
            widget = self.query_one(f"#{_widget_id(stage, field['name'])}")
            empty = convert(field, getattr(widget, "value", None)) in (None, [])
            widget.set_class(field["required"] and empty, "missing")

    def _build(self) -> ops.Command | None:
        stage = self.stage
        try:
            cmd = self.command(stage)
        except (ops.OpError, ValueError) as err:
            self._highlight_missing(stage)
            self.notify(str(err), title=f"{stage}: bad values", severity="error")
            return None
        self._highlight_missing(stage)
        self.query_one("#command", Static).update("$ " + cmd.shell())
        return cmd

    def action_preview(self) -> None:
        self._build()

    def action_launch(self) -> None:
        if self.process is not None and self.process.running:
            self.notify("a stage is already running (ctrl+x cancels it)", severity="warning")
            return
        cmd = self._build()
        if cmd is None:
            return
        self.query_one("#pipeline-log", RichLog).clear()
        self.query_one("#progress", ProgressBar).update(progress=0)
        self.returncode = None
        self.process = CommandRun(
            cmd.argv, self.post_message, env=cmd.env, cwd=self.fleet_app.settings.project_dir
        )
        self.process.start()

    def action_cancel(self) -> None:
        if self.process is None or not self.process.running:
            self.notify("nothing is running", severity="warning")
            return
        self.process.cancel()

    def on_process_output(self, message: ProcessOutput) -> None:
        style = "" if message.stream == "stderr" else "bold"
        self.query_one("#pipeline-log", RichLog).write(Text(message.line, style=style))

    def on_process_progress(self, message: ProcessProgress) -> None:
        self.query_one("#progress", ProgressBar).update(progress=message.percent)
        self.query_one("#command", Static).update(message.text)

    def on_process_exited(self, message: ProcessExited) -> None:
        self.returncode = message.returncode
        log = self.query_one("#pipeline-log", RichLog)
        if message.error:
            self.notify(message.error, title="Cannot start", severity="error")
            return
        if message.returncode == 0:
            self.query_one("#progress", ProgressBar).update(progress=100)
            log.write(Text("finished (exit 0)", style="green"))
            self.notify("stage finished", severity="information")
        else:
            log.write(Text(f"failed (exit {message.returncode})", style="bold red"))
            self.notify(
                f"the stage ended with exit code {message.returncode}: see the log",
                title="Stage failed",
                severity="error",
            )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        actions = {"preview": self.action_preview, "launch": self.action_launch}
        actions.get(event.button.id or "", self.action_cancel)()
