"""The fleet benchmark report: one CSV row per (host, model, quant, threads), read by the TUI.

The bench playbook writes it (default ``results/fleet-report.csv``); the shape lives here only:

==================  =====  ====================================================================
column              type   meaning
==================  =====  ====================================================================
host                str    inventory hostname
board               str    ``pi4``, ``pi5``... (``pi_agent.host.Host.board``)
model               str    model name (the GGUF's manifest name)
quant               str    ``Q4_K_M``, ``Q8_0``...
threads             int    llama-bench ``-t``
pp_tok_s            float  prompt processing tokens/s
tg_tok_s            float  generation tokens/s
expected_tg_tok_s   float  the regressor's expectation for this board, model and quant (may be
                           empty: unknown board)
ok                  bool   the agent's gate verdict (``true``/``false``)
==================  =====  ====================================================================

    rows = read_report(Path("results/fleet-report.csv"))
    write_report(path, rows)     # the same columns, in this order, atomically
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from distill.records import atomic_write_text

COLUMNS = (
    "host",
    "board",
    "model",
    "quant",
    "threads",
    "pp_tok_s",
    "tg_tok_s",
    "expected_tg_tok_s",
    "ok",
)
DEFAULT_PATH = Path("results") / "fleet-report.csv"


class ReportError(ValueError):
    """A report that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class BenchRow:
    """One row of the fleet report."""

    host: str
    board: str
    model: str
    quant: str
    threads: int
    pp_tok_s: float
    tg_tok_s: float
    expected_tg_tok_s: float | None
    ok: bool

    @property
    def below_expected(self) -> bool:
        """Slower than expected, or failed the agent's gate."""
        slow = self.expected_tg_tok_s is not None and self.tg_tok_s < self.expected_tg_tok_s
        return slow or not self.ok


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _row(raw: dict[str, str]) -> BenchRow:
    expected = (raw.get("expected_tg_tok_s") or "").strip()
    return BenchRow(
        host=raw["host"],
        board=raw["board"],
        model=raw["model"],
        quant=raw["quant"],
        threads=int(raw["threads"]),
        pp_tok_s=float(raw["pp_tok_s"]),
        tg_tok_s=float(raw["tg_tok_s"]),
        expected_tg_tok_s=float(expected) if expected else None,
        ok=_bool(raw["ok"]),
    )


def read_report(path: Path) -> list[BenchRow]:
    """Every row of the report; ``ReportError`` on a missing column or a bad value."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ReportError(f"{path}: {err.strerror or err}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ReportError(f"{path}: missing column(s): {', '.join(missing)}")
    rows = []
    for raw in reader:
        try:
            rows.append(_row(raw))
        except (TypeError, ValueError) as err:
            raise ReportError(f"{path}:{reader.line_num}: {err}") from None
    return rows


def write_report(path: Path, rows: Iterable[BenchRow]) -> None:
    """Write the report atomically (a reader never sees half a file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        values = [getattr(row, f.name) for f in fields(BenchRow)]
        writer.writerow(
            ["" if v is None else str(v).lower() if isinstance(v, bool) else v for v in values]
        )
    atomic_write_text(path, buffer.getvalue())
