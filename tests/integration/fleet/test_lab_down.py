"""lab.py down after the session: no stand-in, network, image, SSH key or inventory left, the
cached root file systems kept. Marked ``lab_down``: it runs after every other test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fleet_helpers import LAB, ROOT, fleet_env, run
from lab_helpers import IMAGE

pytestmark = pytest.mark.slow


@pytest.mark.lab_down
def test_lab_down_removes_all_it_made(lab) -> None:
    cache = ROOT / ".cache" / "lab"
    tarballs = sorted(cache.glob("rootfs-*.tar"))  # none when the image came from an earlier run
    planted = cache / "rootfs-keep-me.tar"
    planted.write_bytes(b"")  # down must leave the cache alone
    try:
        run([sys.executable, str(LAB), "down"])
        podman = ["podman", "--runtime", "runc"]
        left = subprocess.run(
            [*podman, "ps", "-a", "--filter", "label=pidistill.lab.host", "-q"],
            capture_output=True, text=True, env=fleet_env(), check=True,
        )  # fmt: skip
        assert left.stdout.strip() == ""
        for kind, name in (("network", "pidistill-lab"), ("image", IMAGE)):
            assert subprocess.run([*podman, kind, "exists", name]).returncode != 0, name
        assert not (cache / "ssh").exists()
        assert not lab.exists()
        assert sorted(cache.glob("rootfs-*.tar")) == sorted([*tarballs, planted])
    finally:
        planted.unlink(missing_ok=True)
