"""`molecule test` for every role that has a scenario: converge, idempotence, verify, destroy.

Each scenario boots the lab's image (made once per session by the ``lab_image`` fixture) with
molecule's podman driver, through a pipelined podman connection (tests/molecule/).

A scenario spends about half its time waiting on podman, so the scenarios run two at a time:
the first test starts them all in a pool of ``PARALLEL`` and each test waits for its own. Each
has its own container and its own ephemeral folders (wheels, tokens, CA, per-class binaries).
zram runs alone, outside the pool: it touches the host's swap, under the zram lock.
The model_sync and bench scenarios deploy the tiny test model as a fake student export.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from fleet_helpers import ROOT, run

from distill import llamacpp

# Scenarios seeded with the workstation's llama.cpp build, and those that deploy a model.
SEEDED = {("llama_cpp", "default"), ("model_sync", "default"), ("bench", "default")}
DEPLOYING = {"model_sync", "bench"}
ALONE = {("zram", "default")}
PARALLEL = 2
SCENARIOS = sorted(
    (p.parents[2].name, p.parent.name) for p in (ROOT / "roles").glob("*/molecule/*/molecule.yml")
)
Scenario = tuple[str, str]


def _molecule(role: str, scenario: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``molecule test -s scenario`` from the role's folder; a failure carries the output's tail."""
    return run([str(Path(sys.executable).parent / "molecule"), "test", "-s", scenario],
               cwd=ROOT / "roles" / role, timeout=1200, env=env, check=False)  # fmt: skip


def _env(role: str, scenario: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """What a scenario needs from the session: the llama.cpp build, the fake student export."""
    env = {}
    if (role, scenario) in SEEDED:
        llamacpp.require_tools()  # the build that seeds the class
    if role in DEPLOYING:
        env["PIDISTILL_FLEET_MODEL_DIR"] = str(request.getfixturevalue("student_export"))
    return env


@pytest.fixture(scope="module")
def pooled(
    lab_image: str, request: pytest.FixtureRequest
) -> Iterator[dict[Scenario, Future[subprocess.CompletedProcess]]]:
    """The selected scenarios but the lone ones, started at once in a pool of ``PARALLEL``."""
    selected = {
        (item.callspec.params["role"], item.callspec.params["scenario"])
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_molecule_scenario_passes"
    }
    with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="molecule") as pool:
        futures = {
            (role, scenario): pool.submit(_molecule, role, scenario, _env(role, scenario, request))
            for role, scenario in SCENARIOS
            if (role, scenario) in selected - ALONE
        }
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.slow
@pytest.mark.parametrize(("role", "scenario"), SCENARIOS, ids=[f"{r}-{s}" for r, s in SCENARIOS])
def test_molecule_scenario_passes(
    role: str, scenario: str, lab_image: str, request: pytest.FixtureRequest
) -> None:
    if (role, scenario) in ALONE:
        request.getfixturevalue("zram_lock")
        done = _molecule(role, scenario, _env(role, scenario, request))
    else:
        done = request.getfixturevalue("pooled")[role, scenario].result()
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"molecule test -s {scenario}: exit {done.returncode}\n{output[-6000:]}"
    )
    assert "idempotence" in output
