"""fleet-tui: the dashboard over the Pi fleet and the distill pipeline.

    fleet-tui                                  # inventory/lab.yml of the current project
    fleet-tui --inventory inventory/example.yml --token-file ~/.config/pidistill/agent-token
    fleet-tui --token-dir secrets/agents       # one token file per host: secrets/agents/<host>
    fleet-tui --ca-file secrets/fleet-ca.pem   # the CA of the agents' certificates
    fleet-tui --replay runs/tui/20260101T120000Z/events.jsonl   # open a saved run

Screens (F2-F6): fleet, run, pipeline, bench, chat; F1 help, ctrl+q quit. Layout lives in app.tcss.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.screen import Screen

from tui.agent import Tokens
from tui.screens.bench import BenchScreen
from tui.screens.chat import ChatScreen
from tui.screens.error import ErrorScreen
from tui.screens.fleet import FleetScreen
from tui.screens.help import HelpScreen
from tui.screens.pipeline import PipelineScreen
from tui.screens.run import RunScreen
from tui.settings import Settings

SCREENS_BY_MODE = {
    "fleet": FleetScreen,
    "run": RunScreen,
    "pipeline": PipelineScreen,
    "bench": BenchScreen,
    "chat": ChatScreen,
}


class FleetApp(App[int]):
    """The app: five modes (one screen each), a help screen, an error screen."""

    CSS_PATH = "app.tcss"
    TITLE = "pidistill fleet"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1,question_mark", "help", "Help"),
        Binding("f2", "switch_mode('fleet')", "Fleet"),
        Binding("f3", "switch_mode('run')", "Run"),
        Binding("f4", "switch_mode('pipeline')", "Pipeline"),
        Binding("f5", "switch_mode('bench')", "Bench"),
        Binding("f6", "switch_mode('chat')", "Chat"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    MODES: ClassVar[dict[str, str]] = {name: name for name in SCREENS_BY_MODE}  # type: ignore[assignment]

    def __init__(self, settings: Settings | None = None, mode: str | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings()
        self.start_mode = mode or ("run" if self.settings.replay else "fleet")
        self.errors: list[str] = []
        self.mode_screens: dict[str, Screen[None]] = {}

    def on_mount(self) -> None:
        for name, screen_class in SCREENS_BY_MODE.items():
            self.mode_screens[name] = screen = screen_class()
            self.install_screen(screen, name)
        self.switch_mode(self.start_mode)

    def on_unmount(self) -> None:
        """Quitting mid-run stops the playbook, the pipeline command and the chat's answers
        rather than orphan them."""
        run, pipeline = self.mode_screens.get("run"), self.mode_screens.get("pipeline")
        chat = self.mode_screens.get("chat")
        if isinstance(chat, ChatScreen):
            chat.action_stop()
        if isinstance(run, RunScreen) and run.busy and run.playbook_run is not None:
            run.playbook_run.cancel()
            run.playbook_run.wait(10)
        if isinstance(pipeline, PipelineScreen) and pipeline.process is not None:
            pipeline.process.cancel()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Every notification; errors are also kept in ``errors`` (shown in help, read by tests)."""
        if severity == "error":
            self.errors.append(f"{title}: {message}" if title else message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def show_error(self, title: str, message: str, detail: str = "") -> None:
        """An error that needs reading: the error screen (and a notification for the record)."""
        self.errors.append(f"{title}: {message}")
        self.push_screen(ErrorScreen(title, message, detail))

    def open_run(self, limit: str = "") -> None:
        """Go to the run screen, its limit set to ``limit``."""
        screen = self.get_screen("run")
        self.switch_mode("run")
        if limit and isinstance(screen, RunScreen):
            self.call_after_refresh(screen.set_limit, limit)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(
            HelpScreen.for_screens(
                {
                    "Everywhere": FleetApp,
                    **{name.capitalize(): screen for name, screen in SCREENS_BY_MODE.items()},
                }
            )
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="fleet-tui", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--inventory",
        "-i",
        action="append",
        type=Path,
        default=[],
        help="inventory file or directory (repeatable; default inventory/lab.yml)",
    )
    parser.add_argument(
        "--project-dir",
        type=Path,
        default=Path.cwd(),
        help="the pidistill checkout: playbooks/, runs/, results/ (default: .)",
    )
    parser.add_argument(
        "--token-file", type=Path, help="the agents' bearer token (one line), for every host"
    )
    parser.add_argument(
        "--token-dir", type=Path, help="a directory of per-host token files named after the host"
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="the CA the agents' https certificates are verified against (default the fleet's CA "
        "in .cache/fleet/ca/ca.pem when it is there, else the system's CAs)",
    )
    parser.add_argument(
        "--report", type=Path, help="the fleet benchmark CSV (default results/fleet-report.csv)"
    )
    parser.add_argument(
        "--refresh", type=float, default=10.0, help="seconds between agent polls (0: poll once)"
    )
    parser.add_argument("--no-poll", action="store_true", help="never contact the agents")
    parser.add_argument("--replay", type=Path, help="open the run screen replaying a saved run")
    parser.add_argument("--screen", choices=sorted(SCREENS_BY_MODE), help="the first screen")
    args = parser.parse_args(argv)
    if not args.project_dir.is_dir():
        parser.error(f"--project-dir {args.project_dir}: not a directory")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments (relative paths resolved against the project)."""
    project = args.project_dir.resolve()

    def under(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else Path.cwd() / path)

    return Settings(
        project_dir=project,
        inventory=tuple(p for p in (under(p) for p in args.inventory) if p is not None),
        tokens=Tokens(token_file=under(args.token_file), token_dir=under(args.token_dir)),
        ca_file=under(args.ca_file),
        report=under(args.report),
        refresh_s=args.refresh,
        poll_agents=not args.no_poll,
        replay=under(args.replay),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the dashboard; 0 on quit, 2 on a bad command line (argparse's one-line error)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    app = FleetApp(settings_from(args), mode=args.screen)
    result = app.run()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
