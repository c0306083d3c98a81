"""The bench screen: the fleet report (``tui.report``) as a table and a chart.

Rows slower than expected, or failed by the agent's gate, are red in both. A missing report is
a hint, not an error (no benchmark has run yet); an unreadable one is an error notification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from tui.report import COLUMNS, BenchRow, ReportError, read_report
from tui.widgets.chart import make_chart

if TYPE_CHECKING:
    from tui.app import FleetApp


def row_cells(row: BenchRow) -> list[Text]:
    """A report row as table cells, red when below expectation."""
    style = "bold red" if row.below_expected else ""
    expected = "" if row.expected_tg_tok_s is None else f"{row.expected_tg_tok_s:.1f}"
    values = [
        row.host,
        row.board,
        row.model,
        row.quant,
        str(row.threads),
        f"{row.pp_tok_s:.1f}",
        f"{row.tg_tok_s:.1f}",
        expected,
        "yes" if row.ok else "NO",
    ]
    return [Text(v, style=style) for v in values]


class BenchScreen(Screen[None]):
    """Report table above, chart below."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+r", "reload", "Reload report")]

    def __init__(self) -> None:
        super().__init__(id="bench")
        self.rows: list[BenchRow] = []

    @property
    def fleet_app(self) -> FleetApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="bench-body"):
            yield Static("", id="bench-status", markup=False)
            yield DataTable(id="bench-table", cursor_type="row", zebra_stripes=True)
            yield make_chart(id="bench-chart")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#bench-table", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.action_reload()

    def action_reload(self) -> None:
        settings = self.fleet_app.settings
        path = settings.report_path
        table = self.query_one("#bench-table", DataTable)
        status = self.query_one("#bench-status", Static)
        table.clear()
        self.rows = []
        if not path.exists():
            where = settings.show(path)
            status.update(f"no fleet report at {where} yet: run the bench playbook (F3)")
        else:
            try:
                self.rows = read_report(path)
            except ReportError as err:
                status.update(f"cannot read the report: {err}")
                self.notify(str(err), title="Fleet report", severity="error")
        for n, row in enumerate(self.rows):
            table.add_row(*row_cells(row), key=f"{n}:{row.host}")
        slow = [r.host for r in self.rows if r.below_expected]
        if self.rows:
            status.update(
                f"{len(self.rows)} rows from {settings.show(path)}; below expected: "
                + (", ".join(slow) if slow else "none")
            )
        self.query_one("#bench-chart").plot(self.rows)  # type: ignore[attr-defined]
