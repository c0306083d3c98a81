"""Fixtures of the fleet tests: the lab's image, a lab of stand-in Pis, one zram test at a time.

The image (a debootstrap root file system, cached under .cache/lab/) is made once per session and
shared by the molecule scenarios and the lab; the lab is brought up once per session and taken
down at its end, with everything it made.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT, fleet_env, require_container_tools, run


@pytest.fixture(scope="session")
def lab_image() -> Iterator[str]:
    """The stand-in image (debootstrap once, cached; imported once per session)."""
    require_container_tools()
    image = run([sys.executable, str(LAB), "image"], timeout=1200).stdout.strip()
    yield image
    # Leave nothing behind: the lab (if any) and the image go; the rootfs tarball stays cached.
    subprocess.run([sys.executable, str(LAB), "down"], env=fleet_env(), check=False,
                   capture_output=True)  # fmt: skip


@pytest.fixture(scope="session")
def lab(lab_image: str) -> Iterator[Path]:
    """Two stand-in Pis, up for the session; yields the generated inventory."""
    done = run([sys.executable, str(LAB), "up", "--hosts", "2"], timeout=600)
    assert "2 stand-in Pi(s) up" in done.stdout
    yield ROOT / "inventory" / "lab.yml"
    subprocess.run([sys.executable, str(LAB), "down", "--keep-image"], env=fleet_env(),
                   check=False, capture_output=True)  # fmt: skip


@pytest.fixture
def zram_lock() -> Iterator[None]:
    """zram and swap are not namespaced: one zram test at a time, across processes."""
    lock = ROOT / ".cache" / "zram-test.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
