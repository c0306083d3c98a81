"""Measure the agent's footprint: RSS, idle CPU and ``/metrics`` latency.

    python -m pi_agent.footprint --json                 # what `make bench` records
    python -m pi_agent.footprint --scrapes 200 --idle-seconds 10

Starts ``pi-agent serve`` without a model (decoder and encoder off, every other collector on),
scrapes ``/metrics`` ``--scrapes`` times over one keep-alive connection, then reads the process's
RSS (``VmRSS``) and its CPU time over ``--idle-seconds`` of idleness. The goals of issue 4:
RSS ≤ 40 MiB, idle CPU ≤ 0.5 %, /metrics p99 ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pi_agent.testing import AgentProcess

GOALS = {"rss_mib": 40.0, "idle_cpu_percent": 0.5, "metrics_p99_ms": 10.0}
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
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    result = measure(args.scrapes, args.idle_seconds)
    out = sys.stdout
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            out.write(f"{key}: {value}\n")
    return 0 if result["meets_goals"] else 1


if __name__ == "__main__":
    sys.exit(main())
