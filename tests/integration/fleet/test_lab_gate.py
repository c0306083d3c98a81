"""The canary's checks after a switch, each made to fire: the throughput gate fails and rolls
back, the same gate passes through an operator's expectation, and a version that stops
answering after its switch is rolled back when the readiness checks run out.

The lab's stand-ins are x86 containers sharing two cores, so their board is ``unknown`` to the
reference table; the gate still has a prediction there, from each agent's own benchmarks (the
bench stage of site.yml), and ``model_sync_gate_expected`` replaces it, both ways.

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and share one
lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary). Each test leaves every
board on the student it found there.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fleet_helpers import make_export, recap, run, version_of
from lab_helpers import HOSTS, PLAYBOOK, active_version, agent_get

pytestmark = pytest.mark.slow

STORE = "/var/lib/pi-agent/models"


@pytest.fixture(scope="module")
def other_export(tmp_path_factory: pytest.TempPathFactory, student_export: Path) -> Path:
    """The student's weights under another name: a new version that loads and answers."""
    weights = next(student_export.glob("*.gguf")).read_bytes()
    return make_export(tmp_path_factory.mktemp("gated") / "dist", weights, name="gated")


def deploy(lab: Path, export: Path, **extra: object) -> list[str]:
    return [PLAYBOOK, "playbooks/deploy.yml", "-i", str(lab),
            "-e", f"fleet_model_dir={export}", "-e", json.dumps(extra)]  # fmt: skip


def serving(lab: Path) -> dict[str, str | None]:
    return {host: active_version(lab, host) for host in HOSTS}


def test_the_canary_s_gate_fails_on_a_slow_board_and_the_fleet_keeps_its_model(
    lab: Path, student_export: Path, other_export: Path
) -> None:
    before = version_of(student_export)
    assert serving(lab) == dict.fromkeys(HOSTS, before)
    done = run(deploy(lab, other_export, model_sync_gate_expected={"tg": 1e6}), check=False)
    assert done.returncode != 0
    counts = recap(done.stdout)
    assert set(counts) == {"pi-1"}, counts  # the rollout stopped at the canary
    assert counts["pi-1"]["failed"] == 1
    # The run says why: which test, how fast, against what, and where the board went back to.
    assert "failed the throughput gate: tg8 with 1 threads" in done.stdout
    assert "of the expected 1000000.00" in done.stdout
    assert f"rolled back to {before}" in done.stdout
    assert serving(lab) == dict.fromkeys(HOSTS, before)
    gate = agent_get(lab, "pi-1", "/v1/bench")["gate"]
    assert gate["passed"] is False and gate["checked"] >= 1, gate
    assert agent_get(lab, "pi-1", "/readyz")["ready"] is True


def test_the_gate_passes_through_an_expectation_and_the_rollout_goes_on(
    lab: Path, student_export: Path, other_export: Path
) -> None:
    expected = {"tg": 0.5, "pp": 0.5}
    done = run(deploy(lab, other_export, model_sync_gate_expected=expected,
                      model_sync_gate_tolerance=0.1))  # fmt: skip
    assert {h: c["failed"] for h, c in recap(done.stdout).items()} == dict.fromkeys(HOSTS, 0)
    assert serving(lab) == dict.fromkeys(HOSTS, version_of(other_export))
    last = agent_get(lab, "pi-1", "/v1/bench")
    assert last["gate"]["passed"] is True and last["gate"]["tolerance"] == 0.1
    assert last["gate"]["checked"] == 2  # both tests were judged, not skipped
    assert {r["predicted_by"] for r in last["results"]} == {"expected"}
    # Back to the student for the tests that follow (no gate: that is not what this test is about,
    # and the boards' own history was measured on a quieter workstation than a test run's).
    run(deploy(lab, student_export, fleet_canary_gate=False))
    assert serving(lab) == dict.fromkeys(HOSTS, version_of(student_export))


def test_a_version_that_stops_answering_after_its_switch_is_rolled_back(
    lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = next(student_export.glob("*.gguf")).read_bytes()
    export = make_export(tmp_path_factory.mktemp("hung") / "dist", weights, name="hung")
    new, before = version_of(export), version_of(student_export)
    # On the canary, once the agent has switched to the new version and its own probe passed
    # (``current`` is the new version and no switch is pending), llama-server hangs (SIGSTOP):
    # it still holds its port but answers nothing, so /readyz says 503 from then on.
    watcher = (
        f'until [ "$(readlink {STORE}/current)" = "versions/{new}" ] '
        f"&& [ ! -e {STORE}/pending-switch.json ]; do sleep 0.02; done; "
        "pkill -STOP -x llama-server"
    )
    subprocess.run(["podman", "--runtime", "runc", "exec", "-d", "pidistill-pi-1",
                    "sh", "-c", watcher], check=True, capture_output=True)  # fmt: skip
    try:
        done = run(deploy(lab, export, model_sync_ready_retries=3), check=False)
    finally:
        subprocess.run(["podman", "--runtime", "runc", "exec", "pidistill-pi-1",
                        "pkill", "-CONT", "-x", "llama-server"], capture_output=True)  # fmt: skip
    assert done.returncode != 0
    counts = recap(done.stdout)
    assert set(counts) == {"pi-1"} and counts["pi-1"]["failed"] == 1, counts
    assert f"{new} not ready after 6 s; rolled back to {before}" in done.stdout
    assert serving(lab) == dict.fromkeys(HOSTS, before)
    assert agent_get(lab, "pi-1", "/readyz")["ready"] is True
