"""``make demo``'s settings: read from the environment, each one documented in .env.example."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from distill.demo import ROOT, TIMES, Settings, run_stage, time_table


def test_every_setting_is_documented_in_the_env_example() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    names = [f.name.upper() for f in dataclasses.fields(Settings)]
    assert [name for name in names if name not in documented] == []


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_LEARNING_RATE", "5e-4")
    monkeypatch.setenv("DEMO_STUDENT_LAYERS", "even")
    monkeypatch.setenv("DEMO_RUN_DIR", "runs/elsewhere")
    settings = Settings.from_env()
    assert settings.demo_learning_rate == 5e-4
    assert settings.demo_student_layers == "even"
    assert settings.demo_run_dir == Path("runs/elsewhere")


def test_a_malformed_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_FLEET_SIZE", "three")
    with pytest.raises(SystemExit, match="DEMO_FLEET_SIZE='three': expected int"):
        Settings.from_env()


def test_the_time_table_sums_the_stages_in_minutes() -> None:
    table = time_table([("label", 600.0, 1140.0), ("train", 300.0, 590.0)])
    rows = table.splitlines()
    assert rows[2] == "| label | 10.0 | 19.0 |"
    assert rows[3] == "| train | 5.0 | 9.8 |"
    assert rows[-1] == "| all stages | 15.0 | 28.8 |"


def test_a_stage_reports_the_cpu_seconds_of_its_process(tmp_path: Path) -> None:
    """A cheap stage (the dataset card): a real subprocess whose CPU time is counted."""
    before = len(TIMES)
    source = ROOT / "dataset" / "quebecois_conversation.jsonl"
    summary = run_stage("card", input=[source], output=tmp_path / "CARD.md")
    assert summary["cpu_seconds"] > 0
    assert summary["wall_seconds"] >= 0
    assert TIMES[before][0] == "card"
