"""What the command line decided, shared by every screen (``app.settings``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill.agent_client import Tokens, fleet_ca
from tui.report import DEFAULT_PATH


@dataclass(frozen=True)
class Settings:
    """fleet-tui's options; relative paths are under ``project_dir``."""

    project_dir: Path = field(default_factory=Path.cwd)
    inventory: tuple[Path, ...] = ()
    tokens: Tokens = field(default_factory=Tokens)
    ca_file: Path | None = None
    report: Path | None = None
    refresh_s: float = 10.0
    poll_agents: bool = True
    replay: Path | None = None

    @property
    def runs_dir(self) -> Path:
        """Where each run's events are saved (``runs/tui/<time>/events.jsonl``)."""
        return self.project_dir / "runs" / "tui"

    @property
    def report_path(self) -> Path:
        """The fleet benchmark report the bench screen reads."""
        return self.report or self.project_dir / DEFAULT_PATH

    def show(self, path: Path) -> str:
        """A path as the UI shows it: relative to the project when inside it."""
        try:
            return str(path.relative_to(self.project_dir))
        except ValueError:
            return str(path)

    def agent_ca(self) -> Path | None:
        """The CA the agents' certificates are verified against: ``ca_file``, else the fleet's
        CA where the pi_agent role makes it (``$PIDISTILL_CACHE_DIR`` or the project's
        ``.cache``, ``fleet/ca/ca.pem``) when it is there, else none (the system's CAs)."""
        return self.ca_file if self.ca_file is not None else fleet_ca(self.project_dir)

    def default_inventory(self) -> tuple[Path, ...]:
        """The inventory to read: the one given, else ``inventory/lab.yml`` when it exists."""
        if self.inventory:
            return self.inventory
        lab = self.project_dir / "inventory" / "lab.yml"
        return (lab,) if lab.exists() else ()
