"""A mixed lab (issue 12): one x86 stand-in and two arm64 ones (a Pi 4 and a Pi 5 under
qemu-user) provisioned by one ``site.yml``: each board gets llama.cpp for its own class (the
x86 one seeded from the workstation's build, the Pis cross-built), the agent and the student;
a second run changes nothing. Marker ``emulation``: ``make test-arm64`` runs it, CI does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT, fleet_env, recap, require_container_tools, run, version_of
from lab_helpers import active_version, on_board, site

# site.yml under emulation runs longer than the suite's 900 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.emulation, pytest.mark.timeout(3600)]

CLASSES = {"pi-1": "x86_64_", "pi-2": "aarch64_pi4", "pi-3": "aarch64_pi5"}
INVENTORY = ROOT / "inventory" / "lab.yml"


@pytest.fixture(scope="module")
def mixed_lab() -> Iterator[Path]:
    require_container_tools()
    done = run([sys.executable, str(LAB), "up", "--arch", "x86_64,arm64:pi4,arm64:pi5"],
               timeout=3600)  # fmt: skip
    assert "3 stand-in Pi(s) up" in done.stdout
    yield INVENTORY
    subprocess.run([sys.executable, str(LAB), "down", "--keep-image"], env=fleet_env(),
                   check=False, capture_output=True)  # fmt: skip


def test_site_provisions_a_mixed_lab_and_a_second_run_changes_nothing(
    mixed_lab: Path, student_export: Path
) -> None:
    results = ROOT / ".cache" / "lab" / "mixed-results"
    first = run(site(mixed_lab, student_export, results, "-e", "fleet_canary_gate=false"),
                timeout=3600)  # fmt: skip
    assert all(c["failed"] == 0 for c in recap(first.stdout).values())
    for host, prefix in CLASSES.items():
        decision = json.loads(on_board(mixed_lab, host, "cat /opt/llama.cpp/current/decision.json"))
        assert decision["class"].startswith(prefix), (host, decision)
        arch = on_board(mixed_lab, host, "uname -m").strip()
        assert arch == ("x86_64" if prefix == "x86_64_" else "aarch64")
        assert active_version(mixed_lab, host) == version_of(student_export)
    again = run(site(mixed_lab, student_export, results, "-e", "fleet_canary_gate=false",
                     "--skip-tags", "bench"), timeout=3600)  # fmt: skip
    counts = recap(again.stdout)
    assert {h: c["changed"] for h, c in counts.items()} == dict.fromkeys(CLASSES, 0), changed_tasks(
        again.stdout
    )


def changed_tasks(output: str) -> list[str]:
    """``TASK [...] host`` for every task that reported changed (what a failure shows)."""
    task, found = "", []
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line.split("]", 1)[0] + "]"
        elif line.startswith("changed: ["):
            found.append(f"{task} {line.split(']', 1)[0][10:]}")
    return found
