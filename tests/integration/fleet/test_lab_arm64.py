"""arm64 stand-ins (issue 12): ``lab.py up --arch arm64 --hosts 2`` boots a Pi 4 and a Pi 5 under
qemu-user, each with systemd as PID 1, ``pi`` with sudo (setuid under emulation: binfmt's ``C``
flag), Raspberry Pi OS's disk swap on, and the board the agent's own code reads from its device
tree. Then ``site.yml`` on them: llama.cpp cross-built per class on the workstation and compared
on each class's first board, the agent serving the student, a second run with changed=0, and
the emulated Pi 4 canary failing the reference table's throughput gate. Marker ``emulation``:
``make test-arm64`` runs it (about 15 minutes), CI does not. The first run builds the arm64 root
file system (cached).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fleet_helpers import LAB, ROOT, fleet_env, recap, require_container_tools, run, version_of
from lab_helpers import PLAYBOOK, active_version, agent_get, site

from pi_agent.regressor import Regressor, read_reference

# site.yml under emulation (the first test's setup) runs longer than the suite's 900 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.emulation, pytest.mark.timeout(3600)]

HOSTS = {"pi-1": "pi4", "pi-2": "pi5"}
MODELS = {"pi4": "Raspberry Pi 4 Model B Rev 1.5", "pi5": "Raspberry Pi 5 Model B Rev 1.0"}
# The agent's own board detection, run by the stand-in's python3 (pi_agent.host is stdlib only).
BOARD_PROBE = (ROOT / "pi_agent" / "host.py").read_text() + (
    "\nhost = Host()\nprint(host.board(), host.board_model(), sep='|')\n"
)


@pytest.fixture(scope="module")
def arm64_lab() -> Iterator[dict[str, dict]]:
    """Two arm64 stand-ins, up for this module; yields the inventory's hosts and their vars.
    Its time (the arm64 image's build the first time, the boot) is the first test's setup in
    pytest's --durations."""
    require_container_tools()
    if shutil.which("qemu-aarch64-static") is None:
        pytest.fail("arm64 stand-ins need qemu-user-static: apt-get install qemu-user-static")
    done = run([sys.executable, str(LAB), "up", "--arch", "arm64", "--hosts", str(len(HOSTS))],
               timeout=3600)  # fmt: skip
    assert f"{len(HOSTS)} stand-in Pi(s) up" in done.stdout
    inventory = yaml.safe_load((ROOT / "inventory" / "lab.yml").read_text())["all"]
    key = inventory["vars"]["ansible_ssh_private_key_file"]
    yield {
        name: {**hostvars, "key": key}
        for name, hostvars in inventory["children"]["pis"]["hosts"].items()
    }
    subprocess.run([sys.executable, str(LAB), "down", "--keep-image"], env=fleet_env(),
                   check=False, capture_output=True)  # fmt: skip


def ssh(hosts: dict[str, dict], host: str, *command: str, stdin: str | None = None,
        check: bool = True) -> str:  # fmt: skip
    """Run ``command`` as ``pi`` on a stand-in (the lab's key); its stdout."""
    cmd = [
        "ssh", "-i", hosts[host]["key"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        f"pi@{hosts[host]['ansible_host']}", *command,
    ]  # fmt: skip
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, (
        f"{' '.join(command)} on {host}: {done.stderr[-2000:]}"
    )
    return done.stdout.strip()


@pytest.mark.parametrize("host", HOSTS)
def test_the_stand_in_is_aarch64_with_systemd_as_pid_1(arm64_lab: dict, host: str) -> None:
    assert arm64_lab[host]["lab_arch"] == "arm64"
    assert ssh(arm64_lab, host, "uname", "-m") == "aarch64"
    assert ssh(arm64_lab, host, "cat", "/proc/1/comm") == "systemd"
    # The emulated sudo is setuid root: the registration's C flag.
    assert ssh(arm64_lab, host, "sudo", "-n", "id", "-u") == "0"


@pytest.mark.parametrize("host", HOSTS)
def test_systemd_boots_the_emulated_pi_without_a_failed_unit(arm64_lab: dict, host: str) -> None:
    """Before the lab's drop-ins, bookworm's three units with LoadCredential= failed under
    qemu-user (243/CREDENTIALS) and every arm64 stand-in was "degraded"."""
    deadline = time.monotonic() + 300  # SSH answers before the boot has finished
    state = ""
    while time.monotonic() < deadline:
        state = ssh(arm64_lab, host, "systemctl", "is-system-running", check=False)
        if state not in ("initializing", "starting"):
            break
        time.sleep(2)
    failed = ssh(arm64_lab, host, "systemctl", "--failed", "--no-legend", "--plain", check=False)
    assert (state, failed) == ("running", ""), (state, failed)


@pytest.mark.parametrize("host", HOSTS)
def test_the_agent_s_board_detection_names_the_pi(arm64_lab: dict, host: str) -> None:
    board = HOSTS[host]
    assert arm64_lab[host]["lab_board"] == board
    detected, model = ssh(arm64_lab, host, "python3", "-", stdin=BOARD_PROBE).split("|")
    assert (detected, model) == (board, MODELS[board])
    # The regressor has an expectation for it: the canary's gate is not "checked=0" there.
    for test in ("pp", "tg"):
        assert Regressor(read_reference()).predict(detected, 135_000_000, "Q8_0", 4, test)


@pytest.mark.parametrize("host", HOSTS)
def test_raspberry_pi_os_disk_swap_is_on(arm64_lab: dict, host: str) -> None:
    assert ssh(arm64_lab, host, "systemctl", "is-enabled", "dphys-swapfile") == "enabled"
    deadline = time.monotonic() + 180  # SSH answers before the boot has finished
    while True:
        state = ssh(arm64_lab, host, "systemctl", "is-active", "dphys-swapfile", check=False)
        if state in ("active", "failed") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert state == "active"
    assert ssh(arm64_lab, host, "stat", "-c", "%s", "/var/swap") == str(100 * 1024 * 1024)


# site.yml on the arm64 lab: llama.cpp cross-built per class on the workstation (each class's
# variants compared by llama-bench on its first board), the agent, the student; then the gate.


@pytest.fixture(scope="module")
def provisioned(arm64_lab: dict, student_export: Path) -> subprocess.CompletedProcess:
    """site.yml on the two arm64 stand-ins with the test student (its canary gate off: the gate
    has its own test below); the per-class cache is the lab's own, so the classes are made here."""
    inventory = ROOT / "inventory" / "lab.yml"
    cache = ROOT / ".cache" / "fleet" / "llama.cpp"
    for board in HOSTS.values():
        for stale in cache.glob(f"*/aarch64_{board}"):
            shutil.rmtree(stale)
    results = ROOT / ".cache" / "lab" / "arm64-results"
    return run(site(inventory, student_export, results, "-e", "fleet_canary_gate=false"),
               timeout=3600)  # fmt: skip


@pytest.mark.parametrize("host", HOSTS)
def test_site_installs_llama_cpp_cross_built_for_the_board_s_class(
    arm64_lab: dict, provisioned: subprocess.CompletedProcess, host: str
) -> None:
    board = HOSTS[host]
    decision = json.loads(ssh(arm64_lab, host, "cat", "/opt/llama.cpp/current/decision.json"))
    assert decision["class"] == f"aarch64_{board}" and decision["board"] == board, decision
    assert decision["origin"].startswith(f"cross-built on the workstation for {board}"), decision
    assert decision["origin"].endswith(f"benchmarked on {'pi-1' if board == 'pi4' else 'pi-2'}")
    # OpenBLAS and native were both measured on the board, with no benchmark model set.
    assert set(decision["bench"]) == {"native", "openblas"}, decision
    # The installed programs are aarch64 ELF files built for the class's -march.
    server = "/opt/llama.cpp/current/bin/llama-server"
    header = ssh(arm64_lab, host, "od", "-An", "-tu1", "-N20", server)
    assert [int(b) for b in header.split()][18] == 183  # EM_AARCH64
    march = {"pi4": "armv8-a+crc", "pi5": "armv8.2-a+crc+dotprod+fp16"}[board]
    assert f"-march={march}" in decision["origin"]


@pytest.mark.parametrize("host", HOSTS)
def test_the_agent_serves_the_student_on_each_arm64_board(
    provisioned: subprocess.CompletedProcess, student_export: Path, host: str
) -> None:
    inventory = ROOT / "inventory" / "lab.yml"
    assert active_version(inventory, host) == version_of(student_export)
    assert agent_get(inventory, host, "/readyz")["ready"] is True
    assert agent_get(inventory, host, "/v1/status")["board"] == HOSTS[host]


def test_a_second_site_run_on_the_arm64_lab_changes_nothing(
    provisioned: subprocess.CompletedProcess, student_export: Path
) -> None:
    inventory = ROOT / "inventory" / "lab.yml"
    results = ROOT / ".cache" / "lab" / "arm64-results"
    again = run(site(inventory, student_export, results, "-e", "fleet_canary_gate=false",
                     "--skip-tags", "bench"), timeout=3600)  # fmt: skip
    counts = recap(again.stdout)
    assert {h: c["changed"] for h, c in counts.items()} == dict.fromkeys(HOSTS, 0), counts


def test_the_canary_s_gate_fails_on_an_emulated_pi_and_the_fleet_keeps_its_model(
    provisioned: subprocess.CompletedProcess,
    student_export: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The reference model itself (SmolLM2-135M-Instruct Q4_1, which the reference table has
    rows for) on the emulated Pi 4 canary: under qemu it runs at ~1 token/s where a Pi 4 does
    11-32, so the gate fails, at the lab's own tolerance too, and the canary rolls back."""
    from distill.models import embedded_teacher_gguf

    inventory = ROOT / "inventory" / "lab.yml"
    export = tmp_path_factory.mktemp("reference") / "dist"
    run([str(ROOT / ".venv" / "bin" / "distill"), "import-gguf", "--gguf",
         str(embedded_teacher_gguf()), "--output-dir", str(export)])  # fmt: skip
    done = run([PLAYBOOK, "playbooks/deploy.yml", "-i", str(inventory),
                "-e", f"fleet_model_dir={export}"], check=False, timeout=3600)  # fmt: skip
    assert done.returncode != 0
    counts = recap(done.stdout)
    assert set(counts) == {"pi-1"} and counts["pi-1"]["failed"] == 1, counts
    assert "failed the throughput gate: pp16 with 1 threads" in done.stdout
    assert "of the predicted" in done.stdout  # the reference table's pi4 rows, not an override
    assert f"rolled back to {version_of(student_export)}" in done.stdout
    for host in HOSTS:
        assert active_version(inventory, host) == version_of(student_export)
