"""``fleet-report`` (tui.fleet_report), the bench role's report builder, on fetched summaries.

Fast: no lab. The CSV must be what the TUI reads (tui.report), and a second build of the same
results must write nothing (site.yml's second run reports changed=0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tui import fleet_report as fleet_report_module
from tui.report import read_report


@pytest.fixture(scope="module")
def fleet_report():
    return fleet_report_module


def summary(board: str, tg: float, predicted: float | None, passed: bool) -> dict:
    return {
        "csv": "/var/lib/pi-agent/bench/20260101T000000Z-h.csv",
        "model_name": "student",
        "metadata": {"board": board, "quant": "Q4_K_M", "model_sha256": "ab" * 32},
        "results": [
            {"test": "pp16", "threads": 4, "tokens_per_second": 50.0, "predicted": None},
            {"test": "tg8", "threads": 4, "tokens_per_second": tg, "predicted": predicted},
        ],
        "gate": {"passed": passed},
    }


def test_report_is_what_the_tui_reads_and_a_rebuild_writes_nothing(
    tmp_path: Path, fleet_report, capsys: pytest.CaptureFixture[str]
) -> None:
    for host, data in {
        "pi-a": summary("pi5", 9.5, 10.0, True),
        "pi-b": summary("unknown", 3.0, None, True),
    }.items():
        (tmp_path / host).mkdir()
        (tmp_path / host / "20260101T000000Z.json").write_text(json.dumps(data))
    argv = ["--results", str(tmp_path), "--hosts", "pi-a", "pi-b", "pi-c"]
    assert fleet_report.main(argv) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(first["changed"]) == 3 and first["missing"] == ["pi-c"]
    rows = read_report(tmp_path / "fleet-report.csv")
    assert [(r.host, r.board, r.tg_tok_s, r.expected_tg_tok_s) for r in rows] == [
        ("pi-a", "pi5", 9.5, 10.0),
        ("pi-b", "unknown", 3.0, None),
    ]
    assert rows[0].below_expected and not rows[1].below_expected
    assert "No benchmark fetched for: pi-c." in (tmp_path / "fleet-report.md").read_text()
    assert (tmp_path / "fleet-report.png").read_bytes().startswith(b"\x89PNG")
    assert fleet_report.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["changed"] == []
