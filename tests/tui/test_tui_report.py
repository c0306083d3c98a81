"""The fleet report: its one reader and writer, and which rows are below expectation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tui.report import COLUMNS, ReportError, read_report, write_report

SAMPLE = Path(__file__).parent / "fixtures" / "project" / "reports" / "fleet-report.csv"


def test_the_sample_report_reads_with_slow_hosts_flagged() -> None:
    rows = read_report(SAMPLE)
    assert [r.host for r in rows] == ["pi-a", "pi-b", "pi-c", "pi-d"]
    assert [r.host for r in rows if r.below_expected] == ["pi-b", "pi-d"]
    assert rows[0].threads == 4 and rows[0].tg_tok_s == pytest.approx(24.1)


def test_a_failed_gate_counts_as_below_expected_even_when_fast() -> None:
    row = replace(read_report(SAMPLE)[0], ok=False)
    assert row.below_expected


def test_write_then_read_gives_the_same_rows(tmp_path: Path) -> None:
    rows = read_report(SAMPLE)
    rows.append(replace(rows[0], host="pi-e", expected_tg_tok_s=None))
    out = tmp_path / "results" / "fleet-report.csv"
    write_report(out, rows)
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_report(out) == rows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host,board\npi-a,pi5\n", "missing column(s): model"),
        (",".join(COLUMNS) + "\npi-a,pi5,m,Q4_0,four,1,1,1,true\n", ":2: invalid literal"),
        (",".join(COLUMNS) + "\npi-a,pi5,m,Q4_0,4,1,1,1,maybe\n", "expected true or false"),
    ],
    ids=["a column is missing", "threads is not a number", "ok is not a boolean"],
)
def test_a_bad_report_is_one_error_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "report.csv"
    path.write_text(text)
    with pytest.raises(ReportError, match=r"report\.csv") as err:
        read_report(path)
    assert message in str(err.value)
