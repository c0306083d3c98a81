"""``make bench``'s report: every section writes Markdown and CSV with its goals."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from distill import bench
from distill.bench import Row


def test_render_writes_one_row_per_measure_in_both_formats() -> None:
    rows = [
        Row("labelling", "loop", 15.3, "tok/s", "fp32", "baseline", ""),
        Row("agent", "rss_mib", 24.6, "MiB", "idle", "<= 40.0", "yes"),
    ]
    markdown, table = bench.render(rows, "2026-11-25 00:00 UTC")
    assert "| labelling | loop | 15.3 | tok/s | baseline |  | fp32 |" in markdown
    assert "| agent | rss_mib | 24.6 | MiB | <= 40.0 | yes | idle |" in markdown
    parsed = list(csv.DictReader(io.StringIO(table)))
    assert [r["name"] for r in parsed] == ["loop", "rss_mib"]
    assert parsed[1]["met"] == "yes"


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        bench.main(["--rows", "0"])
    assert caught.value.code == 2
    assert "--rows must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_the_agent_section_measures_a_real_agent(tmp_path: Path) -> None:
    assert bench.main(["--out", str(tmp_path), "--only", "agent"]) == 0
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    measured = {r["name"]: float(r["value"]) for r in rows}
    assert 0 < measured["rss_mib"] < 200
    assert measured["metrics_p99_ms"] > 0
    assert "# pidistill benchmarks" in (tmp_path / "bench.md").read_text()
