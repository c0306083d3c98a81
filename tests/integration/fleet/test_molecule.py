"""`molecule test` for every role that has a scenario: converge, idempotence, verify, destroy.

Each scenario boots the lab's image (made once per session by the ``lab_image`` fixture) with
molecule's podman driver. Scenarios run one after another: the zram one touches swap settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fleet_helpers import ROOT, run

SCENARIOS = sorted(
    (p.parents[2].name, p.parent.name) for p in (ROOT / "roles").glob("*/molecule/*/molecule.yml")
)


@pytest.mark.slow
@pytest.mark.parametrize(("role", "scenario"), SCENARIOS, ids=[f"{r}-{s}" for r, s in SCENARIOS])
def test_molecule_scenario_passes(
    role: str, scenario: str, lab_image: str, zram_lock: None
) -> None:
    if (role, scenario) == ("llama_cpp", "default"):
        pytest.importorskip("distill.llamacpp").require_tools()  # the build that seeds the class
    done = run([str(Path(sys.executable).parent / "molecule"), "test", "-s", scenario],
               cwd=ROOT / "roles" / role, timeout=900)  # fmt: skip
    assert "idempotence" in done.stdout + done.stderr
