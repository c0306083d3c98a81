"""Fixtures of the TUI tests: the recorded streams, a scratch copy of the sample project, and
``until`` — the one way these tests wait (poll a condition between pilot pauses, never sleep).
"""

from __future__ import annotations

import shutil
import subprocess
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


def make_ca(base: Path, name: str) -> tuple[Path, Path]:
    """A throwaway CA (EC key, made with the ``openssl`` command line): its certificate and key."""
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    return base / f"{name}.pem", base / f"{name}.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fleet CA, an agent certificate it signed for 127.0.0.1 and localhost, and a second,
    foreign CA: ``ca``, ``cert``, ``key``, ``other_ca``."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    base = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(base, "fleet-ca")
    other_ca, _ = make_ca(base, "other-ca")
    subprocess.run(
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "agent.key", "-out", "agent.csr", "-subj", "/CN=pi-a"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    (base / "agent.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n"
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", "agent.csr", "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", "agent.pem", "-days", "2", "-extfile", "agent.ext"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    return {"ca": ca, "cert": base / "agent.pem", "key": base / "agent.key", "other_ca": other_ca}
