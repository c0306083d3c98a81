"""Faults in a rollout: a corrupt model stops at the canary, which rolls back, and a host lost
mid-run fails alone and is named in the recap while the others finish.

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and
share one lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT, fleet_env, recap, run, version_of
from lab_helpers import HOSTS, PLAYBOOK, active_version, agent_get, site

pytestmark = pytest.mark.slow


def test_a_corrupt_model_stops_at_the_canary_which_rolls_back(
    lab: Path, student_export: Path, corrupt_export: Path
) -> None:
    done = run([PLAYBOOK, "playbooks/deploy.yml", "-i", str(lab),
                "-e", f"fleet_model_dir={corrupt_export}"], check=False)  # fmt: skip
    assert done.returncode != 0
    counts = recap(done.stdout)
    assert set(counts) == {"pi-1"}, counts  # the rollout never reached pi-2 and pi-3
    assert counts["pi-1"]["failed"] == 1
    assert "the agent rolled back to " + version_of(student_export) in done.stdout
    # The canary was given the broken version, refused it, and serves the old model again.
    assert version_of(corrupt_export) in [
        m["version"] for m in agent_get(lab, "pi-1", "/v1/models")["data"]
    ]
    assert {h: active_version(lab, h) for h in HOSTS} == dict.fromkeys(
        HOSTS, version_of(student_export)
    )
    assert agent_get(lab, "pi-1", "/readyz")["ready"] is True


def test_a_host_stopped_mid_run_fails_alone_and_is_named_in_the_recap(
    lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cmd = site(lab, student_export, tmp_path_factory.mktemp("results"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fleet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    stopped = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not stopped and line.startswith("TASK [pi_agent"):
                # Mid-run: provisioning is under way on every host.
                subprocess.run(["podman", "--runtime", "runc", "stop", "--time", "1",
                                "pidistill-pi-3"], check=True, capture_output=True)  # fmt: skip
                stopped = True
        proc.wait(timeout=1200)
        output = "".join(lines)
        assert stopped, output[-3000:]
        counts = recap(output)
        assert counts["pi-3"]["unreachable"] + counts["pi-3"]["failed"] >= 1, counts
        for host in ("pi-1", "pi-2"):
            assert counts[host]["failed"] == 0 and counts[host]["unreachable"] == 0, counts
        assert "PLAY [Benchmark the fleet]" in output  # the others went on to the last stage
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        # Bring pi-3 back (its address may change: the inventory is written again).
        run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)
