"""Delivery between boards: pulls from peers over HTTPS (aria2c trusting the fleet's CA only),
BitTorrent from the canary's seed (confined units, a private torrent), a source cut
mid-transfer replaced by another, and boards killed mid-rollout named, then completed by a
rerun.

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and
share one lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fleet_helpers import (
    LAB,
    cap_uplink,
    link_counter,
    make_export,
    recap,
    run,
    stand_in_link,
    version_of,
)
from lab_helpers import (
    HOSTS,
    agent_get,
    background,
    delivery,
    holds,
    lab_hosts,
    on_board,
    on_stand_in,
)

pytestmark = pytest.mark.slow


PEERS = ["-e", json.dumps({"model_sync_sources": [{"type": "peers"}, {"type": "push"}]})]


def cut_pi1_mid_transfer(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with pi-1's and pi-2's uplinks capped at 16 Mbit/s and take pi-1's link down
    once it sent 1 MB; then the link and the lab's caps come back. Returns (exit status, output)."""
    for host in ("pi-1", "pi-2"):
        cap_uplink(host, "16mbit")
    veth, _ = stand_in_link("pi-1")
    before = link_counter("pi-1")
    proc = background(cmd)
    try:
        deadline = time.monotonic() + 300
        while link_counter("pi-1") - before < 1_000_000:
            assert proc.poll() is None and time.monotonic() < deadline, "pi-1 never sent"
            time.sleep(0.05)
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["ip", "link", "set", veth, "up"], check=False)
        run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)  # caps back
    return proc.returncode, output


def test_boards_pull_from_peers_and_a_source_cut_mid_transfer_is_replaced(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    size = 24_000_000
    export = make_export(tmp_path_factory.mktemp("peers") / "dist",
                         b"GGUF\x03\x00\x00\x00" + os.urandom(size), name="peers")  # fmt: skip
    # The canary gets it from the workstation; pi-2 pulls it from the canary.
    served = link_counter("pi-1")
    done = run(delivery(lab, export, "--limit", "pi-1,pi-2", *PEERS))
    assert "Download the GGUF with aria2, peers" in done.stdout, done.stdout[-3000:]
    assert holds(lab, "pi-1", export) and holds(lab, "pi-2", export)
    assert link_counter("pi-1") - served > size  # pi-1 sent it (to pi-2)

    # pi-3 pulls from both; pi-1's link goes down after its first MB.
    before = link_counter("pi-1")
    returncode, output = cut_pi1_mid_transfer(delivery(lab, export, "--limit", "pi-3", *PEERS))
    assert returncode == 0, output[-4000:]
    assert "Download the GGUF with aria2, peers 2" in output
    assert link_counter("pi-1") - before < size  # cut off before it sent it all: pi-2 did the rest
    assert holds(lab, "pi-3", export)
    # The peer token reached aria2c on its standard input: no settings file holds it.
    for host in ("pi-2", "pi-3"):
        assert on_board(lab, host, "ls /etc/pi-agent").split() == sorted(
            [
                "agent.toml",
                "allowlist",
                "fleet-ca.pem",
                "peer-token",
                "service-token",
                "tls.key",
                "tls.pem",
                "token",
            ]
        )


def test_aria2_on_a_board_gets_a_blob_from_a_peer_only_through_the_fleet_ca(lab: Path) -> None:
    """What the peers source runs, by hand on pi-3 against pi-1's agent: with the fleet's CA the
    blob comes (a dry run: headers only), with the system's CAs the TLS handshake is refused."""
    sha = agent_get(lab, "pi-1", "/v1/models")["data"][0]["sha256"]
    url = f"{lab_hosts(lab)['pi-1']['pi_agent_url']}/v1/blobs/{sha}"
    script = (
        "set -e; t=$(cat /etc/pi-agent/peer-token); "
        "printf '%s\\n  header=Authorization: Bearer %s\\n' " + url + ' "$t" | '
        "aria2c --input-file=- --dry-run=true --max-tries=1 --console-log-level=error "
        "--summary-interval=0 --download-result=hide --dir=/tmp {ca} 2>&1; echo exit=$?"
    )
    trusted = on_board(lab, "pi-3", script.format(ca="--ca-certificate=/etc/pi-agent/fleet-ca.pem"))
    assert trusted.strip().endswith("exit=0"), trusted
    refused = on_board(lab, "pi-3", script.replace("set -e; ", "").format(ca=""))
    assert "exit=0" not in refused and "handshake" in refused.lower(), refused


# The sockets a stand-in listens on (/proc/net/tcp and tcp6, state LISTEN), as (address, port).
LISTENERS = r"""
import ipaddress
for name, size in (("tcp", 4), ("tcp6", 16)):
    for line in open(f"/proc/net/{name}").readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            raw, port = local.split(":")
            packed = b"".join(bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, len(raw), 8))
            print(ipaddress.ip_address(packed[:size]), int(port, 16))
"""


def check_swarm_confined(inventory: Path, host: str) -> None:
    """The torrent source's seed and tracker on ``host`` run as the agent's user, unprivileged,
    behind the address allow list, listening on the board's fleet address only."""
    units = on_stand_in(host, "systemctl", "list-units", "--plain", "--no-legend", "pidistill-*")
    names = [line.split()[0] for line in units.splitlines()]
    assert "pidistill-tracker.service" in names
    assert any(name.startswith("pidistill-seed-") for name in names), names
    expected = {"User": "pi-agent", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
                "ProtectSystem": "strict"}  # fmt: skip
    shown_properties = ",".join([*expected, "IPAddressDeny"])
    for name in names:
        shown = on_stand_in(host, "systemctl", "show", name, f"--property={shown_properties}")
        got = dict(line.split("=", 1) for line in shown.splitlines())
        # systemd prints the deny list in either order ("::/0 0.0.0.0/0" on some versions).
        assert set(got.pop("IPAddressDeny", "").split()) == {"0.0.0.0/0", "::/0"}, (name, shown)
        assert got == expected, (name, shown)
    users = on_stand_in(host, "ps", "-o", "user=", "-C", "aria2c,opentracker").split()
    assert users and set(users) == {"pi-agent"}, users
    address = lab_hosts(inventory)[host]["ansible_host"]
    swarm_ports = {6969, *range(6881, 6890)}  # the tracker's and aria2c's (model_sync defaults)
    sockets = on_stand_in(host, "python3", "-c", LISTENERS)
    listening = [line.split() for line in sockets.splitlines()]
    swarm = {(addr, int(port)) for addr, port in listening if int(port) in swarm_ports}
    assert (address, 6969) in swarm, listening
    assert {addr for addr, _ in swarm} == {address}, listening  # not 0.0.0.0, not ::


def test_boards_share_the_model_over_bittorrent_and_a_seed_cut_mid_transfer_is_replaced(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    size = 24_000_000
    export = make_export(tmp_path_factory.mktemp("torrent") / "dist",
                         b"GGUF\x03\x00\x00\x00" + os.urandom(size), name="torrent")  # fmt: skip
    # deploy.yml's default: the canary gets it from the workstation and seeds it; pi-2 downloads
    # it over BitTorrent.
    served = link_counter("pi-1")
    done = run(delivery(lab, export, "--limit", "pi-1,pi-2"))
    assert "Download the GGUF from the swarm, seeds 1" in done.stdout, done.stdout[-3000:]
    assert holds(lab, "pi-1", export) and holds(lab, "pi-2", export)
    assert link_counter("pi-1") - served > size  # pi-1 seeded it (to pi-2)
    assert (export / ".torrents").is_dir()  # the .torrent, made once on the workstation
    # Private (mktorrent -p): clients keep it off DHT and peer exchange.
    (torrent,) = (export / ".torrents").glob("*.torrent")
    assert b"7:privatei1e" in torrent.read_bytes()
    # Seed and tracker (pi-1) confined; pi-2's download ran as the agent's user: the agent moved
    # the file aria2c wrote into its store, owner and all.
    check_swarm_confined(lab, "pi-1")
    stored = f"/var/lib/pi-agent/models/versions/{version_of(export)}/model.gguf"
    assert on_stand_in("pi-2", "stat", "-c", "%U", stored).strip() == "pi-agent"

    # pi-3 downloads from both seeds (pi-1 and pi-2 hold it); pi-1's link goes down after 1 MB.
    before = {host: link_counter(host) for host in ("pi-1", "pi-2")}
    returncode, output = cut_pi1_mid_transfer(delivery(lab, export))
    assert returncode == 0, output[-4000:]
    assert "Download the GGUF from the swarm, seeds 2" in output
    assert link_counter("pi-1") - before["pi-1"] < size  # cut off before it sent it all
    assert link_counter("pi-2") - before["pi-2"] > size / 2  # pi-2 did the rest
    assert holds(lab, "pi-3", export)


def test_boards_killed_mid_rollout_are_named_and_a_rerun_completes_them(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = b"GGUF\x03\x00\x00\x00" + os.urandom(24_000_000)
    export = make_export(tmp_path_factory.mktemp("rollout") / "dist", weights, name="rollout")
    cap_uplink("pi-1", "16mbit")  # the wave after the canary takes a few seconds
    sent = link_counter("pi-1")
    proc = background(delivery(lab, export))
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    killed = False
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            # The canary serves the wave (pi-2, pi-3): once it sent 2 MB, pi-3 dies mid-download.
            if not killed and link_counter("pi-1") - sent > 2_000_000:
                subprocess.run(["podman", "--runtime", "runc", "kill", "pidistill-pi-3"],
                               check=True, capture_output=True)  # fmt: skip
                killed = True
            time.sleep(0.05)
        proc.wait(timeout=60)
        reader.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert killed, output[-3000:]
    counts = recap(output)
    assert proc.returncode != 0
    assert counts["pi-3"]["unreachable"] + counts["pi-3"]["failed"] >= 1, counts  # named
    assert all(counts[h]["failed"] == 0 and counts[h]["unreachable"] == 0 for h in ("pi-1", "pi-2"))
    assert holds(lab, "pi-2", export)  # the rest finished

    run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)  # pi-3 back
    again = recap(run(delivery(lab, export), timeout=900).stdout)
    assert {h: c["failed"] + c["unreachable"] for h, c in again.items()} == dict.fromkeys(HOSTS, 0)
    assert again["pi-1"]["changed"] == again["pi-2"]["changed"] == 0  # nothing moved there
    assert holds(lab, "pi-3", export)
