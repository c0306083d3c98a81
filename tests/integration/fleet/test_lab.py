"""The lab end to end: stand-in Pis over SSH, provisioning on them, a second run that changes
nothing, and a lab-down that leaves nothing behind.

Tests in this file run in order and share one lab (the session's ``lab`` fixture, two hosts).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from fleet_helpers import LAB, ROOT, fleet_env, recap, run

pytestmark = pytest.mark.slow


def lab_hosts(inventory) -> dict[str, dict]:
    return yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"]


def test_every_stand_in_answers_ssh_as_pi_with_sudo(lab) -> None:
    key = ROOT / ".cache" / "lab" / "ssh" / "id_ed25519"
    hosts = lab_hosts(lab)
    assert sorted(hosts) == ["pi-1", "pi-2"]
    for name, hostvars in hosts.items():
        assert hostvars["ansible_host"] == "127.0.0.1"  # published on loopback only
        done = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(hostvars["ansible_port"]), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "pi@127.0.0.1", "hostname && sudo -n id -u && systemctl is-system-running"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout.split() == [name, "0", "running"], done.stderr


def test_site_provisions_the_lab_and_a_second_run_changes_nothing(lab) -> None:
    pytest.importorskip("distill.llamacpp").require_tools()  # seeds the stand-ins' class
    cmd = [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "playbooks/site.yml", "-i", str(lab)]
    first = recap(run(cmd, timeout=900).stdout)
    assert set(first) == {"pi-1", "pi-2"}
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in first.values())
    assert all(counts["changed"] > 0 for counts in first.values())
    second = recap(run(cmd, timeout=900).stdout)
    assert {host: counts["changed"] for host, counts in second.items()} == {"pi-1": 0, "pi-2": 0}


def test_lab_down_removes_all_it_made(lab) -> None:
    run([sys.executable, str(LAB), "down"])
    podman = ["podman", "--runtime", "runc"]
    left = subprocess.run([*podman, "ps", "-a", "--filter", "label=pidistill.lab.host", "-q"],
                          capture_output=True, text=True, env=fleet_env(), check=True)  # fmt: skip
    assert left.stdout.strip() == ""
    for kind, name in (("network", "pidistill-lab"), ("image", "localhost/pidistill-lab:bookworm")):
        assert subprocess.run([*podman, kind, "exists", name]).returncode != 0, name
    assert not (ROOT / ".cache" / "lab" / "ssh").exists()
    assert not lab.exists()
    assert list((ROOT / ".cache" / "lab").glob("rootfs-*.tar"))  # the cache stays
    run([sys.executable, str(LAB), "image"])  # the molecule scenarios of this session need it back
