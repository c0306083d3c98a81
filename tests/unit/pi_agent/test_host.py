"""The get_throttled reading (issue 13): a vcgencmd that fails, is missing or hangs is never an
error page and never stalls the event loop; fake vcgencmd scripts stand in for the firmware's."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pi_agent import metrics
from pi_agent.host import Host
from pi_agent.testing import AgentProcess

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi_agent"
PI4 = FIXTURES / "pi4" / "root"  # its sysfs get_throttled word is 0x50000
PI5 = FIXTURES / "pi5" / "root"


def fake_vcgencmd(tmp_path: Path, body: str) -> str:
    path = tmp_path / "vcgencmd"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@dataclass(frozen=True)
class Fake:
    id: str
    script: str | None  # None: no vcgencmd at the configured path


FAILING = [
    Fake("exits non-zero (the agent's user is not in video)",
         "echo 'VCHI initialization failed' >&2; exit 255"),
    Fake("answers something else", "echo 'error=1 error_msg=\"Command not registered\"'"),
    Fake("hangs", "exec sleep 30"),
    Fake("is missing", None),
]  # fmt: skip
TIMEOUT = 0.5


def vcgencmd_for(tmp_path: Path, fake: Fake) -> str:
    if fake.script is None:
        return str(tmp_path / "no-vcgencmd")
    return fake_vcgencmd(tmp_path, fake.script)


@pytest.mark.parametrize("fake", FAILING, ids=[f.id for f in FAILING])
def test_a_vcgencmd_that_cannot_answer_gives_way_to_sysfs(tmp_path: Path, fake: Fake) -> None:
    vcgencmd = vcgencmd_for(tmp_path, fake)
    host = Host(PI4)
    start = time.monotonic()
    assert host.throttled(vcgencmd, timeout=TIMEOUT) == (0x50000, "sysfs")
    assert asyncio.run(host.throttled_async(vcgencmd, timeout=TIMEOUT)) == (0x50000, "sysfs")
    assert time.monotonic() - start < 4 * TIMEOUT + 1


@pytest.mark.parametrize("fake", FAILING, ids=[f.id for f in FAILING])
def test_without_vcgencmd_or_sysfs_the_reading_is_unknown(tmp_path: Path, fake: Fake) -> None:
    vcgencmd = vcgencmd_for(tmp_path, fake)
    host = Host(tmp_path / "empty-root")
    with pytest.raises(OSError):  # what every other reader of Host raises
        host.throttled(vcgencmd, timeout=TIMEOUT)
    assert asyncio.run(host.throttled_async(vcgencmd, timeout=TIMEOUT)) is None


def test_a_working_vcgencmd_is_preferred(tmp_path: Path) -> None:
    vcgencmd = fake_vcgencmd(tmp_path, "echo throttled=0x4")
    assert asyncio.run(Host(PI4).throttled_async(vcgencmd)) == (4, "vcgencmd")


async def _longest_stall(work: Awaitable[Any]) -> tuple[Any, float]:
    """``work``'s result and the longest the event loop went without running a 10 ms ticker."""
    wakes = [time.monotonic()]

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.01)
            wakes.append(time.monotonic())

    tick = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        tick.cancel()
    wakes.append(time.monotonic())  # a stall still going on when the work ended counts too
    return result, max(later - earlier for earlier, later in itertools.pairwise(wakes))


def test_a_slow_vcgencmd_runs_off_the_event_loop(tmp_path: Path) -> None:
    vcgencmd = fake_vcgencmd(tmp_path, "sleep 1; echo throttled=0x4")
    reading, stall = asyncio.run(_longest_stall(Host(PI4).throttled_async(vcgencmd, timeout=5)))
    assert reading == (4, "vcgencmd")
    assert stall < 0.2


def test_the_throttling_collector_leaves_the_event_loop_free(tmp_path: Path) -> None:
    vcgencmd = fake_vcgencmd(tmp_path, "sleep 1; echo throttled=0x4")
    host = Host(PI4)
    registry = metrics.Registry([metrics.ThrottlingCollector(host, vcgencmd)], host)
    text, stall = asyncio.run(_longest_stall(registry.render()))
    assert 'pi_agent_throttled_raw{source="vcgencmd"} 4' in text
    assert stall < 0.2


# The agent's endpoints.


def test_status_answers_when_vcgencmd_fails(tmp_path: Path) -> None:
    vcgencmd = fake_vcgencmd(tmp_path, "echo 'VCHI initialization failed' >&2; exit 255")
    config = {
        "agent": {"root": PI5},
        "decoder": {"enabled": False},
        "metrics": {"vcgencmd": vcgencmd},
    }
    with AgentProcess(tmp_path / "agent", config) as agent:
        status, body = agent.json("GET", "/v1/status")
        assert status == 200, body
        assert body["throttled"]["source"] == "sysfs" and body["board"] == "pi5"
    config["agent"]["root"] = tmp_path / "empty-root"
    with AgentProcess(tmp_path / "bare", config) as agent:
        status, body = agent.json("GET", "/v1/status")
        assert status == 200, body
        assert body["throttled"] is None and "Traceback" not in agent.log()


def _healthz_while(agent: AgentProcess, path: str, started: Path) -> float:
    """Seconds a /healthz takes while ``path`` waits on a vcgencmd that touched ``started``."""
    slow = threading.Thread(target=agent.request, args=("GET", path))
    slow.start()
    try:
        agent.wait_for(started.exists, timeout=10)
        before = time.monotonic()
        assert agent.request("GET", "/healthz", auth=False)[0] == 200
        return time.monotonic() - before
    finally:
        slow.join()
        started.unlink()


@pytest.mark.slow
def test_a_slow_vcgencmd_does_not_stall_healthz_during_a_scrape(tmp_path: Path) -> None:
    started = tmp_path / "vcgencmd-started"
    vcgencmd = fake_vcgencmd(tmp_path, f"touch {started}; sleep 1.5; echo throttled=0x0")
    config = {
        "agent": {"root": PI5},
        "decoder": {"enabled": False},
        "metrics": {"vcgencmd": vcgencmd},
    }
    with AgentProcess(tmp_path / "agent", config) as agent:
        assert _healthz_while(agent, "/metrics", started) < 0.5


@pytest.mark.slow
def test_a_slow_vcgencmd_does_not_stall_healthz_during_a_status(tmp_path: Path) -> None:
    started = tmp_path / "vcgencmd-started"
    vcgencmd = fake_vcgencmd(tmp_path, f"touch {started}; sleep 1.5; echo throttled=0x0")
    config = {
        "agent": {"root": PI5},
        "decoder": {"enabled": False},
        "metrics": {"vcgencmd": vcgencmd},
    }
    with AgentProcess(tmp_path / "agent", config) as agent:
        assert _healthz_while(agent, "/v1/status", started) < 0.5
