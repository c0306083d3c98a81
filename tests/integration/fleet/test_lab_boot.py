"""The lab's stand-ins: each answers SSH as pi with sudo, on the lab's own network, and a
stand-in whose systemd dies while booting is recreated once.

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and
share one lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess

import pytest
from fleet_helpers import ROOT, lab_module
from lab_helpers import HOSTS, lab_hosts

pytestmark = pytest.mark.slow


def test_every_stand_in_answers_ssh_as_pi_with_sudo(lab) -> None:
    key = ROOT / ".cache" / "lab" / "ssh" / "id_ed25519"
    hosts = lab_hosts(lab)
    assert sorted(hosts) == HOSTS
    addresses = {hostvars["ansible_host"] for hostvars in hosts.values()}
    assert len(addresses) == len(hosts)
    for name, hostvars in hosts.items():
        # Each on the lab's own network, reached directly (no port published on the workstation).
        address = ipaddress.ip_address(hostvars["ansible_host"])
        assert address.is_private and not address.is_loopback
        assert hostvars["pi_agent_url"] == f"https://{address}:8470"
        done = subprocess.run(
            ["ssh", "-i", str(key), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             f"pi@{address}", "hostname && sudo -n id -u && systemctl is-system-running"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout.split() == [name, "0", "running"], done.stderr


def test_a_stand_in_whose_systemd_dies_while_booting_is_recreated_once(
    lab, capsys: pytest.CaptureFixture[str]
) -> None:
    lab_module()  # scripts/ on the path: the lab's steps are labkit's modules
    from labkit import boot, common

    key = common.ssh_key()
    name = boot.start(9, key)  # a spare stand-in, outside the inventory
    try:
        first = subprocess.run(["podman", "--runtime", "runc", "inspect", "--format",
                                "{{.Id}} {{.State.Pid}}", name], capture_output=True, text=True,
                               check=True).stdout.split()  # fmt: skip
        os.kill(int(first[1]), signal.SIGKILL)  # its systemd, before sshd is up
        boot.boot(9, key)
        assert "its systemd (PID 1) is gone while booting" in capsys.readouterr().err
        assert boot.init_alive(name)
        again = subprocess.run(
            ["podman", "--runtime", "runc", "inspect", "--format", "{{.Id}}", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert again != first[0]  # a new container, not the dead one
    finally:
        subprocess.run(["podman", "--runtime", "runc", "rm", "--force", "--time", "1", name],
                       capture_output=True, check=False)  # fmt: skip
