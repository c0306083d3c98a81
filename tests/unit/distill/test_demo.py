"""``make demo``'s settings: read from the environment, each one documented in .env.example."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from distill.demo import ROOT, Settings


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
