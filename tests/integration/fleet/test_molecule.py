"""`molecule test` for every role that has a scenario: converge, idempotence, verify, destroy.

Each scenario boots the lab's image (made once per session by the ``lab_image`` fixture) with
molecule's podman driver, through a pipelined podman connection (tests/molecule/).

A scenario spends about half its time waiting on podman, so the scenarios run two at a time:
the first test starts them all in a pool of ``PARALLEL`` and each test waits for its own. Each
has its own container and its own ephemeral folders (wheels, tokens, CA, per-class binaries).
zram's scenarios run alone, outside the pool: it touches the host's swap, under the zram lock.
The model_sync and bench scenarios deploy the tiny test model as a fake student export.

Scenarios whose platform is the arm64 image (zram, pi_agent and llama_cpp's ``build``: an
emulated Pi 4 or Pi 5) are marked ``emulation``: ``make test-arm64`` runs them, CI does not.
They boot ``lab.py image --arch arm64``'s image with a Pi's device tree.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fleet_helpers import ROOT, run

from distill import llamacpp

# Scenarios seeded with the workstation's llama.cpp build, and those that deploy a model.
SEEDED = {("llama_cpp", "default"), ("model_sync", "default"), ("bench", "default")}
DEPLOYING = {"model_sync", "bench"}
ALONE = {("zram", "default"), ("zram", "arm64")}
PARALLEL = 2
SCENARIOS = sorted(
    (p.parents[2].name, p.parent.name) for p in (ROOT / "roles").glob("*/molecule/*/molecule.yml")
)
Scenario = tuple[str, str]


def _arm64(role: str, scenario: str) -> bool:
    """Whether the scenario's platforms boot the arm64 image (emulated under qemu-user)."""
    path = ROOT / "roles" / role / "molecule" / scenario / "molecule.yml"
    return any(p["image"].endswith("-arm64") for p in yaml.safe_load(path.read_text())["platforms"])


ARM64 = {s for s in SCENARIOS if _arm64(*s)}
PARAMS = [
    pytest.param(role, scenario, id=f"{role}-{scenario}",
                 marks=[pytest.mark.emulation] if (role, scenario) in ARM64 else [])
    for role, scenario in SCENARIOS
]  # fmt: skip


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


def _images(scenarios: set[Scenario], request: pytest.FixtureRequest) -> None:
    """The images the scenarios boot: the native one, and the arm64 one for emulated scenarios."""
    if scenarios - ARM64:
        request.getfixturevalue("lab_image")
    if scenarios & ARM64:
        request.getfixturevalue("lab_image_arm64")


@pytest.fixture(scope="module")
def pooled(
    request: pytest.FixtureRequest,
) -> Iterator[dict[Scenario, Future[subprocess.CompletedProcess]]]:
    """The selected scenarios but the lone ones, started at once in a pool of ``PARALLEL``."""
    selected = {
        (item.callspec.params["role"], item.callspec.params["scenario"])
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_molecule_scenario_passes"
    }
    _images(selected, request)
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
@pytest.mark.parametrize(("role", "scenario"), PARAMS)
def test_molecule_scenario_passes(role: str, scenario: str, request: pytest.FixtureRequest) -> None:
    if (role, scenario) in ALONE:
        _images({(role, scenario)}, request)
        request.getfixturevalue("zram_lock")
        done = _molecule(role, scenario, _env(role, scenario, request))
    else:
        done = request.getfixturevalue("pooled")[role, scenario].result()
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"molecule test -s {scenario}: exit {done.returncode}\n{output[-6000:]}"
    )
    assert "idempotence" in output
