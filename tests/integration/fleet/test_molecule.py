"""`molecule test` for every role that has a scenario: converge, idempotence, verify, destroy.

Each scenario boots the lab's image (made once per session by the ``lab_image`` fixture) with
molecule's podman driver. Scenarios run one after another: the zram one touches swap settings.
The model_sync and bench scenarios deploy the tiny test model as a fake student export.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fleet_helpers import ROOT, run

# Scenarios seeded with the workstation's llama.cpp build, and those that deploy a model.
SEEDED = {("llama_cpp", "default"), ("model_sync", "default"), ("bench", "default")}
DEPLOYING = {"model_sync", "bench"}
SCENARIOS = sorted(
    (p.parents[2].name, p.parent.name) for p in (ROOT / "roles").glob("*/molecule/*/molecule.yml")
)


@pytest.mark.slow
@pytest.mark.parametrize(("role", "scenario"), SCENARIOS, ids=[f"{r}-{s}" for r, s in SCENARIOS])
def test_molecule_scenario_passes(
    role: str, scenario: str, lab_image: str, zram_lock: None, request: pytest.FixtureRequest
) -> None:
    env = {}
    if (role, scenario) in SEEDED:
        pytest.importorskip("distill.llamacpp").require_tools()  # the build that seeds the class
    if role in DEPLOYING:
        env["PIDISTILL_FLEET_MODEL_DIR"] = str(request.getfixturevalue("student_export"))
    done = run([str(Path(sys.executable).parent / "molecule"), "test", "-s", scenario],
               cwd=ROOT / "roles" / role, timeout=900, env=env)  # fmt: skip
    assert "idempotence" in done.stdout + done.stderr
