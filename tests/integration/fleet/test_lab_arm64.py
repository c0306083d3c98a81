"""arm64 stand-ins (issue 12): ``lab.py up --arch arm64 --hosts 2`` boots a Pi 4 and a Pi 5 under
qemu-user, each with systemd as PID 1, ``pi`` with sudo (setuid under emulation: binfmt's ``C``
flag), Raspberry Pi OS's disk swap on, and the board the agent's own code reads from its device
tree. No playbook runs here (emulation makes each Ansible task several times slower): this is
the smallest arm64 check CI can afford. The first run builds the arm64 root file system (cached).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml
from fleet_helpers import LAB, ROOT, fleet_env, require_container_tools, run

from pi_agent.regressor import Regressor, read_reference

pytestmark = [pytest.mark.slow, pytest.mark.emulation]

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
