"""The lab's link caps: tc's token bucket filter on each stand-in's link, both ways, and on
the workstation's uplink into the lab."""

from __future__ import annotations

import subprocess

from labkit.common import NETWORK, LabError, podman, sh


def tc_cap(device: str, rate: str, netns_pid: int | None = None) -> None:
    """Cap ``device``'s egress at ``rate`` with a token bucket (``0``: remove the cap)."""
    enter = ["nsenter", "-t", str(netns_pid), "-n"] if netns_pid else []
    if rate in ("", "0"):
        subprocess.run([*enter, "tc", "qdisc", "del", "dev", device, "root"],
                       capture_output=True, check=False)  # fmt: skip
        return
    # The burst must hold a whole GSO segment (64 KiB on veth) or tbf drops it.
    sh([*enter, "tc", "qdisc", "replace", "dev", device, "root",
        "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"])  # fmt: skip


def host_veth(container: str) -> tuple[str, int]:
    """The workstation's end of a stand-in's link, and the stand-in's PID (for its netns)."""
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", container).strip())
    # "2: eth0@if168: ..." (netlink answers for the netns; /sys would show the workstation's)
    inside = sh(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "dev", "eth0"])
    peer = inside.split(":", 2)[1].strip().partition("@if")[2]
    for line in sh(["ip", "-o", "link", "show"]).splitlines():
        index, name = line.split(":", 2)[:2]
        if peer and index.strip() == peer:
            return name.strip().split("@")[0], pid
    raise LabError(f"{container}: no workstation end of its link (ifindex {peer or '?'})")


def shape(names: list[str], link_rate: str, uplink_rate: str) -> None:
    """Cap every stand-in's link both ways, and the workstation's uplink (the bridge's egress)."""
    bridge = podman("network", "inspect", "--format", "{{.NetworkInterface}}", NETWORK).strip()
    tc_cap(bridge, uplink_rate)
    for name in names:
        veth, pid = host_veth(name)
        tc_cap(veth, link_rate)  # towards the Pi: its downlink
        tc_cap("eth0", link_rate, netns_pid=pid)  # from the Pi: its uplink
