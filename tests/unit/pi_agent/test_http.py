"""Byte ranges as RFC 9110 reads them: one range served, the rest ignored or refused with 416;
the server's limits (connections, head timeout, open files) on a real server on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pi_agent import config
from pi_agent.config import ConfigError
from pi_agent.http import (
    HEAD_TIMEOUT_S,
    MAX_CONNECTIONS,
    HTTPError,
    Request,
    Response,
    Server,
    byte_range,
)


@dataclass(frozen=True)
class Case:
    header: str | None
    size: int
    expected: tuple[int, int] | None


CASES = {
    "no header: the whole file": Case(None, 1000, None),
    "first and last byte": Case("bytes=0-99", 1000, (0, 99)),
    "one byte": Case("bytes=10-10", 1000, (10, 10)),
    "from a byte to the end": Case("bytes=900-", 1000, (900, 999)),
    "the last n bytes": Case("bytes=-100", 1000, (900, 999)),
    "a suffix longer than the file is the whole file": Case("bytes=-5000", 1000, (0, 999)),
    "an end past the file is clamped": Case("bytes=990-5000", 1000, (990, 999)),
    "a huge end is clamped": Case("bytes=1-" + "9" * 40, 1000, (1, 999)),
    "the unit is case-insensitive": Case("Bytes=1-2", 1000, (1, 2)),
    "several ranges: the whole file": Case("bytes=0-1,5-6", 1000, None),
    "an end before the start is ignored": Case("bytes=5-3", 1000, None),
    "another unit is ignored": Case("items=0-1", 1000, None),
    "garbage is ignored": Case("bytes=a-b", 1000, None),
    "no numbers is ignored": Case("bytes=-", 1000, None),
    "an empty file is served whole": Case("bytes=0-10", 0, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_byte_range(case: Case) -> None:
    assert byte_range(case.header, case.size) == case.expected


@pytest.mark.parametrize(
    "header",
    ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=" + "9" * 40 + "-"],
    ids=["start at the size", "start past the size", "empty suffix", "huge start"],
)
def test_unsatisfiable_ranges_are_416_with_the_size(header: str) -> None:
    with pytest.raises(HTTPError) as err:
        byte_range(header, 1000)
    assert err.value.status == 416
    assert err.value.headers == {"Content-Range": "bytes */1000"}


# The server's limits, on a real server on loopback in this process.

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` (without answering)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


class Served:
    """A Server on 127.0.0.1 answering 200, or holding ``/block`` until ``release`` is set."""

    def __init__(self, **limits: Any) -> None:
        self.server = Server(self.handle, **limits)
        self.release = asyncio.Event()
        self.blocked = 0
        self.port = 0

    async def handle(self, request: Request) -> Response:
        if request.path == "/block":
            self.blocked += 1
            await self.release.wait()
        return Response.json({"status": "ok"})

    async def __aenter__(self) -> Served:
        self.port = await self.server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


def test_beyond_the_cap_the_oldest_idle_connection_makes_room() -> None:
    async def go() -> None:
        async with Served(max_connections=3) as served:
            idle = [await served.connect() for _ in range(3)]
            await _until(lambda: served.server.open_connections == 3)
            reader, writer = await served.connect()
            writer.write(HEALTHZ)
            assert (await asyncio.wait_for(_answer(reader), 2)).startswith(b"HTTP/1.1 200")
            assert await _closed(idle[0][0], 2), "the oldest idle connection was kept"
            assert served.server.open_connections == 3
            for _, idle_writer in idle:
                idle_writer.close()
            writer.close()

    asyncio.run(go())


def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed_at_once() -> None:
    async def go() -> None:
        async with Served(max_connections=2) as served:
            busy = [await served.connect() for _ in range(2)]
            for _, writer in busy:
                writer.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            await _until(lambda: served.blocked == 2)
            reader, writer = await served.connect()
            assert await _closed(reader, 2), "a connection beyond the cap was kept"
            served.release.set()
            for busy_reader, busy_writer in busy:
                assert (await asyncio.wait_for(_answer(busy_reader), 2)).startswith(b"HTTP/1.1 200")
                busy_writer.close()
            writer.close()

    asyncio.run(go())


def test_a_connection_without_a_complete_head_is_closed_after_the_head_timeout() -> None:
    async def go() -> None:
        async with Served(head_timeout_s=0.3) as served:
            silent_reader, silent_writer = await served.connect()
            slow_reader, slow_writer = await served.connect()
            slow_writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            start = time.monotonic()
            assert await _closed(silent_reader, 3) and await _closed(slow_reader, 3)
            assert 0.25 <= time.monotonic() - start < 2
            silent_writer.close()
            slow_writer.close()

    asyncio.run(go())


def test_a_keep_alive_connection_may_wait_longer_than_the_head_timeout_between_requests() -> None:
    async def go() -> None:
        async with Served(head_timeout_s=0.3) as served:
            reader, writer = await served.connect()
            writer.write(HEALTHZ)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.6)  # quiet for twice the head timeout, within the keep-alive
            writer.write(HEALTHZ)
            assert (await asyncio.wait_for(_answer(reader), 2)).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /hea")  # once the next head starts, it has the head timeout
            start = time.monotonic()
            assert await _closed(reader, 3)
            assert 0.25 <= time.monotonic() - start < 2
            writer.close()

    asyncio.run(go())


def test_keep_alive_answers_do_not_wait_for_a_delayed_ack() -> None:
    async def go() -> float:
        async with Served() as served:
            reader, writer = await served.connect()
            took = []
            for _ in range(21):
                start = time.perf_counter()
                writer.write(HEALTHZ)
                await _answer(reader)
                took.append(time.perf_counter() - start)
            writer.close()
            return sorted(took)[10]

    # Head and body go out as two writes: without TCP_NODELAY the body waits for the client's
    # delayed ACK of the head, 40 ms on Linux.
    assert asyncio.run(go()) < 0.02


@dataclass(frozen=True)
class BadLimits:
    limits: dict[str, Any]
    message: str


@pytest.mark.parametrize(
    "case",
    [
        BadLimits({"max_connections": 0}, "max_connections must be at least 1"),
        BadLimits({"head_timeout_s": 0.0}, "head_timeout_s must be positive"),
    ],
    ids=["no connections", "no time for a head"],
)
def test_limits_that_cannot_serve_are_refused(case: BadLimits) -> None:
    with pytest.raises(ValueError, match=case.message):
        Server(Served.handle, **case.limits)  # type: ignore[arg-type]


def test_the_server_lifts_its_soft_open_files_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip(f"the hard open files limit is {hard}: nothing to lift")

    async def go() -> None:
        async with Served():
            pass

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        asyncio.run(go())
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _fill_fd_table() -> list[int]:
    """Open /dev/null until every fd number below the next free one is taken; the new fds."""
    taken = {int(path.name) for path in Path("/proc/self/fd").iterdir()}
    filler = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        filler.append(fd)
        if fd > max(taken):
            return filler


def test_running_out_of_fds_is_one_warning_and_the_server_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        async with Served(max_connections=1000) as served:
            clients = [socket.socket() for _ in range(20)]  # their fds, before the table is full
            filler = _fill_fd_table()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (filler[-1], hard))  # no fd left
            try:
                for client in clients:
                    client.setblocking(False)
                    client.connect_ex(("127.0.0.1", served.port))
                await asyncio.sleep(1.5)  # every accept fails meanwhile
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in filler:
                    os.close(fd)
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert warnings[0].name == "pi_agent.http"
            assert "Too many open files" in warnings[0].getMessage()
            assert warnings[0].exc_info is None  # one line, no traceback
            # fds again: the connections queued meanwhile are served.
            reader, writer = await asyncio.open_connection(sock=clients[-1])
            writer.write(HEALTHZ)
            assert (await asyncio.wait_for(_answer(reader), 3)).startswith(b"HTTP/1.1 200")
            writer.close()
            for client in clients[:-1]:
                client.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(go())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("agent.max_connections=0", "agent.max_connections must be at least 1"),
        ("agent.head_timeout_s=0", "agent.head_timeout_s must be positive"),
        ("agent.head_timeout_s=-1.5", "agent.head_timeout_s must be positive"),
    ],
)
def test_the_configured_limits_are_checked_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=[override])


def test_the_configured_limits_default_to_the_servers() -> None:
    cfg = config.load(overrides=[])
    assert cfg["agent"]["max_connections"] == MAX_CONNECTIONS
    assert cfg["agent"]["head_timeout_s"] == HEAD_TIMEOUT_S
