"""Measure the agent's footprint: RSS, idle CPU and ``/metrics`` latency, and under a flood.

    python -m pi_agent.footprint --json                 # what `make bench` records
    python -m pi_agent.footprint --scrapes 200 --idle-seconds 10
    python -m pi_agent.footprint --flood 2000           # and 2,000 idle connections

Starts ``pi-agent serve`` without a model (decoder and encoder off, every other collector on),
scrapes ``/metrics`` ``--scrapes`` times over one keep-alive connection, then reads the process's
RSS (``VmRSS``) and its CPU time over ``--idle-seconds`` of idleness. The goals of issue 4:
RSS ≤ 40 MiB, idle CPU ≤ 0.5 %, /metrics p99 ≤ 10 ms.

The flood (issue 13) opens ``--flood`` TCP connections that never send a byte and holds them, then
times fresh ``GET /healthz`` requests and reads the agent's RSS, open fds and log. The agent starts
with systemd's default soft limit of 1,024 open files, the limit it must lift itself out of. The
goals: /healthz answered within 1 s, RSS ≤ 40 MiB, fewer than 100 log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import os
import re
import resource
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pi_agent.testing import AgentProcess

GOALS = {"rss_mib": 40.0, "idle_cpu_percent": 0.5, "metrics_p99_ms": 10.0}
FLOOD_GOALS = {"flood_healthz_max_ms": 1000.0, "flood_rss_mib": 40.0, "flood_log_lines": 99}
SYSTEMD_SOFT_NOFILE = 1024  # a service's soft RLIMIT_NOFILE unless its unit says otherwise
FLOOD_SPARE_FDS = 64  # the flooding process's own fds beside its client ends
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE set to ``limit`` (children started meanwhile inherit
    it), then put back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limits(pid: int) -> tuple[int, int]:
    """``(soft, hard)`` RLIMIT_NOFILE of a process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise OSError(f"/proc/{pid}/limits: no open files limit")


def _healthz_ms(port: int, timeout: float) -> float | None:
    """One fresh connection's ``GET /healthz`` in ms; ``None`` when it failed or timed out."""
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return None
    return (time.perf_counter() - start) * 1000 if answer.startswith(b"HTTP/1.1 200") else None


def _connect_idle(port: int, count: int, timeout: float) -> tuple[list[socket.socket], int]:
    """``count`` connections that send nothing; the sockets and how many the kernel connected
    within ``timeout`` (the others may still be retrying their SYN)."""
    socks, connected = [], 0
    with selectors.DefaultSelector() as selector:
        try:
            for _ in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.setblocking(False)
                if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                    continue
                selector.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while selector.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    selector.unregister(key.fileobj)
                    connected += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        except BaseException:
            for sock in socks:
                sock.close()
            raise
    return socks, connected


def flood(
    agent: AgentProcess, connections: int = 2000, hold_s: float = 3.0, probes: int = 7
) -> dict[str, Any]:
    """Hold ``connections`` idle connections to a running agent for ``hold_s`` and measure it
    ``probes`` times meanwhile (shorter than the agent's head timeout, so they stay its
    problem)."""
    assert agent.proc is not None
    pid = agent.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + FLOOD_SPARE_FDS
    if hard < needed:
        raise RuntimeError(f"a flood of {connections} needs {needed} open files, not {hard}")
    rss, fds, latencies = [], [], []
    with soft_nofile(max(soft, needed)):
        socks, connected = _connect_idle(agent.port, connections, timeout=10.0)
        try:
            start = time.monotonic()
            for probe in range(probes):
                # The flood lasts hold_s whatever the agent does: the probes are spread over it.
                time.sleep(max(0.0, start + probe * hold_s / (probes - 1) - time.monotonic()))
                latencies.append(_healthz_ms(agent.port, timeout=5.0))
                rss.append(_rss_mib(pid))
                fds.append(sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()))
        finally:
            for sock in socks:
                sock.close()
    answered = [ms for ms in latencies if ms is not None]
    agent_soft, agent_hard = open_files_limits(pid)
    return {
        "flood_connections": connections,
        "flood_connected": connected,
        "flood_healthz_failures": len(latencies) - len(answered),
        "flood_healthz_max_ms": round(max(answered), 3) if answered else None,
        "flood_healthz_p50_ms": round(_percentile(answered, 50), 3) if answered else None,
        "flood_rss_mib": round(max(rss), 2),
        "flood_agent_fds": max(fds),
        "flood_log_lines": len(agent.log().splitlines()),
        "agent_nofile_soft": agent_soft,
        "agent_nofile_hard": agent_hard,
    }


def flood_meets_goals(result: dict[str, Any]) -> bool:
    """Every /healthz answered in time, RSS and log lines within their goals."""
    return (
        result["flood_healthz_failures"] == 0
        and result["flood_healthz_max_ms"] <= FLOOD_GOALS["flood_healthz_max_ms"]
        and result["flood_rss_mib"] <= FLOOD_GOALS["flood_rss_mib"]
        and result["flood_log_lines"] <= FLOOD_GOALS["flood_log_lines"]
    )


def measure_flood(connections: int = 2000, start_timeout: float = 20.0) -> dict[str, Any]:
    """Start an agent as systemd would (soft limit 1,024), flood it, stop it. The flood is
    smaller where this process's hard limit cannot hold its client ends."""
    connections = min(connections, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - FLOOD_SPARE_FDS)
    with tempfile.TemporaryDirectory(prefix="pi-agent-flood-") as tmp:
        agent = AgentProcess(
            Path(tmp),
            {"decoder": {"enabled": False}, "encoder": {"enabled": False}},
            start_timeout=start_timeout,
        )
        with soft_nofile(SYSTEMD_SOFT_NOFILE):
            agent.start()
        try:
            result = flood(agent, connections)
        finally:
            agent.stop()
    result["goals"] = FLOOD_GOALS
    result["meets_goals"] = flood_meets_goals(result)
    return result


def measure(
    scrapes: int = 200, idle_seconds: float = 5.0, start_timeout: float = 20.0
) -> dict[str, Any]:
    """Start an agent, measure it, stop it; returns the numbers and whether each goal is met."""
    with tempfile.TemporaryDirectory(prefix="pi-agent-footprint-") as tmp:
        agent = AgentProcess(
            Path(tmp),
            {"decoder": {"enabled": False}, "encoder": {"enabled": False}},
            start_timeout=start_timeout,
        )
        with agent:
            assert agent.proc is not None
            pid = agent.proc.pid
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
            headers = agent.headers()
            latencies = []
            for _ in range(scrapes):
                start = time.perf_counter()
                conn.request("GET", "/metrics", headers=headers)
                resp = conn.getresponse()
                resp.read()
                latencies.append((time.perf_counter() - start) * 1000)
                if resp.status != 200:
                    raise RuntimeError(f"/metrics answered {resp.status}")
            conn.close()
            rss = _rss_mib(pid)
            cpu_start, wall_start = _cpu_seconds(pid), time.monotonic()
            time.sleep(idle_seconds)  # measuring idleness is the point here
            idle_cpu = (_cpu_seconds(pid) - cpu_start) / (time.monotonic() - wall_start) * 100
            rss_after_idle = _rss_mib(pid)
    result = {
        "rss_mib": round(max(rss, rss_after_idle), 2),
        "idle_cpu_percent": round(idle_cpu, 3),
        "metrics_p50_ms": round(_percentile(latencies, 50), 3),
        "metrics_p99_ms": round(_percentile(latencies, 99), 3),
        "scrapes": scrapes,
        "idle_seconds": idle_seconds,
        "python": sys.version.split()[0],
    }
    result["goals"] = GOALS
    result["meets_goals"] = (
        result["rss_mib"] <= GOALS["rss_mib"]
        and result["idle_cpu_percent"] <= GOALS["idle_cpu_percent"]
        and result["metrics_p99_ms"] <= GOALS["metrics_p99_ms"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m pi_agent.footprint``: exit 1 when a goal is missed."""
    parser = argparse.ArgumentParser(prog="python -m pi_agent.footprint", description=__doc__)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--flood",
        type=int,
        default=0,
        metavar="CONNECTIONS",
        help="also measure under this many idle connections (0: no flood)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    result = measure(args.scrapes, args.idle_seconds)
    if args.flood:
        flooded = measure_flood(args.flood)
        result = {
            **result,
            **flooded,
            "goals": {**GOALS, **FLOOD_GOALS},
            "meets_goals": result["meets_goals"] and flooded["meets_goals"],
        }
    out = sys.stdout
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            out.write(f"{key}: {value}\n")
    return 0 if result["meets_goals"] else 1


if __name__ == "__main__":
    sys.exit(main())
