"""A stand-in made again is a new machine: the lab forgets Ansible's cached facts for its name
(an arm64 pi-1 once inherited the x86 pi-1's architecture from the cache, for an hour)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import lab
from labkit import inventory


def test_forget_facts_drops_only_the_named_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory, "FACTS", tmp_path)
    for name in ("s1_pi-1", "s1_pi-10", "pi-2", "s1_pi-3", "README"):
        (tmp_path / name).write_text("{}")
    lab.forget_facts(["pidistill-pi-1", "pidistill-pi-2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "s1_pi-10", "s1_pi-3"]


def test_forget_facts_without_a_cache_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory, "FACTS", tmp_path / "absent")
    lab.forget_facts(["pidistill-pi-1"])
    assert not (tmp_path / "absent").exists()
