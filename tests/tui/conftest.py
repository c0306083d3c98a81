"""Fixtures of the TUI tests: the recorded streams, a scratch copy of the sample project, and
``until`` — the one way these tests wait (poll a condition between pilot pauses, never sleep).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tui.testing import until as until_helper

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EVENTS = FIXTURES / "events"
SIZE = (140, 40)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (Textual's loop)."""
    return "asyncio"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of ``fixtures/project`` (playbooks, inventory, report): runs land in it."""
    target = tmp_path / "project"
    shutil.copytree(FIXTURES / "project", target)
    return target


@pytest.fixture
def fixtures() -> Path:
    """``tests/tui/fixtures``."""
    return FIXTURES


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """An inventory file ansible cannot parse."""
    from tui.testing import BROKEN_INVENTORY

    path = tmp_path / "broken.yml"
    path.write_text(BROKEN_INVENTORY)
    return path


@pytest.fixture
def until() -> Callable[..., Any]:
    """The waiting helper (a fixture, since test modules do not import each other)."""
    return until_helper
