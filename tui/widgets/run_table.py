"""The run screen's tables: one row per (task, host) as ansible-navigator shows it, and the recap.

``RunTable.apply(event)`` acts on an ansible-runner event by its name (``EVENTS``) and answers
whether it knew the name; the screen logs and drops the ones it did not.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.widgets import DataTable

# status -> style; "started" until a result arrives
STATUS_STYLES = {
    "started": "dim",
    "ok": "green",
    "changed": "yellow",
    "failed": "bold red",
    "ignored": "magenta",
    "skipped": "cyan",
    "unreachable": "bold red reverse",
}
# Runner events that carry output for the log pane but no row change.
LOG_ONLY_EVENTS = frozenset(
    {
        "playbook_on_start",
        "playbook_on_play_start",
        "playbook_on_task_start",
        "playbook_on_handler_task_start",
        "playbook_on_cleanup_task_start",
        "playbook_on_include",
        "playbook_on_notify",
        "playbook_on_no_hosts_matched",
        "playbook_on_no_hosts_remaining",
        "playbook_on_vars_prompt",
        "playbook_on_setup",
        "playbook_on_import_for_host",
        "playbook_on_not_import_for_host",
        "runner_item_on_ok",
        "runner_item_on_failed",
        "runner_item_on_skipped",
        "runner_retry",
        "runner_on_async_poll",
        "runner_on_async_ok",
        "runner_on_async_failed",
        "runner_on_file_diff",
        "runner_on_no_hosts",
        "verbose",
        "debug",
        "warning",
        "deprecated",
        "error",
        "system_warning",
    }
)
RECAP_COLUMNS = ("ok", "changed", "unreachable", "failures", "skipped", "rescued", "ignored")


def result_status(event: dict[str, Any]) -> str | None:
    """The row status an event sets, or ``None`` when its name sets none."""
    name = event.get("event")
    data = event.get("event_data") or {}
    if name == "runner_on_start":
        return "started"
    if name in ("runner_on_ok", "runner_on_changed"):
        changed = name == "runner_on_changed" or bool((data.get("res") or {}).get("changed"))
        return "changed" if changed else "ok"
    if name == "runner_on_failed":
        return "ignored" if data.get("ignore_errors") else "failed"
    if name == "runner_on_skipped":
        return "skipped"
    if name == "runner_on_unreachable":
        return "unreachable"
    return None


class RunTable(DataTable[Any]):
    """Rows keyed by (task uuid, host): a result event updates the row its start made."""

    EVENTS: ClassVar[frozenset[str]] = frozenset(
        {
            "runner_on_start",
            "runner_on_ok",
            "runner_on_changed",
            "runner_on_failed",
            "runner_on_skipped",
            "runner_on_unreachable",
        }
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.statuses: dict[tuple[str, str], str] = {}

    def on_mount(self) -> None:
        for label, key in (
            ("#", "n"),
            ("Status", "status"),
            ("Host", "host"),
            ("Task", "task"),
            ("Time", "duration"),
            ("Action", "action"),
            ("Play", "play"),
        ):
            self.add_column(label, key=key)

    def reset(self) -> None:
        """Forget every row (a new run or replay)."""
        self.clear()
        self.statuses.clear()

    def status_of(self, task: str, host: str) -> str | None:
        """The status of the row for a task (by name) and host; ``None`` if none."""
        for (task_name, row_host), status in self.statuses.items():
            if row_host == host and task_name.split("|", 1)[1] == task:
                return status
        return None

    def apply(self, event: dict[str, Any]) -> bool:
        """Update the table from one event; False when the event's name is not a row event."""
        if event.get("event") not in self.EVENTS:
            return False
        status = result_status(event)
        data = event.get("event_data") or {}
        host = str(data.get("host") or "?")
        task_uuid = str(data.get("task_uuid") or data.get("task") or "?")
        key = (f"{task_uuid}|{data.get('task') or '?'}", host)
        row_key = "\x00".join(key)
        label = Text(status or "?", style=STATUS_STYLES.get(status or "", ""))
        duration = data.get("duration")
        took = f"{duration:.1f}s" if isinstance(duration, int | float) else ""
        if key not in self.statuses:
            self.add_row(
                str(len(self.statuses) + 1),
                label,
                host,
                str(data.get("task") or ""),
                took,
                str(data.get("task_action") or ""),
                str(data.get("play") or ""),
                key=row_key,
            )
            if self.cursor_row >= self.row_count - 2:  # follow the run unless the user scrolled
                self.move_cursor(row=self.row_count - 1)
        else:
            self.update_cell(row_key, "status", label)
            if took:
                self.update_cell(row_key, "duration", took)
        self.statuses[key] = status or "?"
        return True


class RecapTable(DataTable[Any]):
    """PLAY RECAP: one row per host from ``playbook_on_stats``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.recap: dict[str, dict[str, int]] = {}

    def on_mount(self) -> None:
        self.add_column("Host", key="host")
        for name in RECAP_COLUMNS:
            self.add_column(name, key=name)

    def reset(self) -> None:
        """Forget the recap."""
        self.clear()
        self.recap.clear()

    def show(self, stats: dict[str, Any]) -> None:
        """Fill the table from a ``playbook_on_stats`` event's data."""
        self.reset()
        per_host: dict[str, dict[str, int]] = {}
        for column in (*RECAP_COLUMNS, "dark", "processed"):
            counts = stats.get(column) or {}
            if not isinstance(counts, dict):
                continue
            for host, count in counts.items():
                name = "unreachable" if column == "dark" else column
                per_host.setdefault(str(host), {})[name] = int(count)
        for host in sorted(per_host):
            counts = per_host[host]
            bad = counts.get("failures", 0) or counts.get("unreachable", 0)
            cells = [Text(host, style="bold red" if bad else "green")]
            cells += [str(counts.get(c, 0)) for c in RECAP_COLUMNS]
            self.add_row(*cells, key=host)
        self.recap = per_host
