"""The bench screen's chart: measured against expected generation tokens/s per host.

``textual-plotext`` draws it when installed; otherwise ``BarChart`` (below) draws horizontal bars
with Rich, so the screen works on a bare install. ``make_chart()`` picks.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from tui.report import BenchRow


def _label(row: BenchRow) -> str:
    return f"{row.host} {row.quant}"


class BarChart(Static):
    """Two bars per row (measured, expected), scaled to the widest value; slow rows in red."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rows: list[BenchRow] = []

    def plot(self, rows: list[BenchRow]) -> None:
        """Draw ``rows``."""
        self._rows = list(rows)
        self.refresh(layout=True)

    def render(self) -> Group | Text:
        if not self._rows:
            return Text("no benchmark rows", style="dim")
        width = max(10, self.size.width - 34)
        top = max(max(r.tg_tok_s, r.expected_tg_tok_s or 0.0) for r in self._rows) or 1.0
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        for row in self._rows:
            style = "bold red" if row.below_expected else "green"
            bar = "█" * max(1, round(row.tg_tok_s / top * width))
            table.add_row(_label(row), Text(bar, style=style), f"{row.tg_tok_s:.1f} tok/s")
            if row.expected_tg_tok_s is not None:
                expected = "░" * max(1, round(row.expected_tg_tok_s / top * width))
                table.add_row("", Text(expected, style="dim"), f"exp {row.expected_tg_tok_s:.1f}")
        return Group(Text("generation tok/s: measured █  expected ░", style="bold"), table)


def make_chart(**kwargs: Any) -> Widget:
    """A plotext chart when ``textual-plotext`` is installed, else ``BarChart``."""
    try:
        from textual_plotext import PlotextPlot
    except ImportError:
        return BarChart(**kwargs)

    class PlotextChart(PlotextPlot):
        """Grouped bars via plotext."""

        def plot(self, rows: list[BenchRow]) -> None:
            plt = self.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title("generation tok/s: measured vs expected")
            if rows:
                labels = [_label(r) for r in rows]
                measured = [r.tg_tok_s for r in rows]
                expected = [r.expected_tg_tok_s or 0.0 for r in rows]
                plt.multiple_bar(labels, [measured, expected], labels=["measured", "expected"])
            self.refresh()

    return PlotextChart(**kwargs)
