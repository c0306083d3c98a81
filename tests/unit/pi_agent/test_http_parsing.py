"""Malformed requests against a real agent on loopback, over raw sockets: each one is a 400 and a
closed connection, never a 500, a traceback or bytes read as a second request."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pi_agent.testing import AgentProcess

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi_agent"
SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    config = {
        "agent": {"root": FIXTURES / "pi5" / "root", "log_level": "debug"},
        "decoder": {"enabled": False},
        "metrics": {"vcgencmd": ""},
    }
    with AgentProcess(tmp_path_factory.mktemp("parsing"), config) as proc:
        yield proc


def exchange(agent: AgentProcess, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``data``, read until the agent closes or ``timeout`` passes: (bytes, closed)."""
    received = b""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
    return received, True


def statuses(raw: bytes) -> list[int]:
    """The status of every response in ``raw``."""
    return [int(line.split(b" ")[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


@dataclass(frozen=True)
class Malformed:
    id: str
    request: bytes


def get(*headers: bytes, body: bytes = b"") -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n" + body


MALFORMED = [
    # "²" passes str.isdigit() and then fails int(): a 500 once, before the token was checked.
    Malformed("a superscript digit as Content-Length", get(b"Content-Length: \xb2")),
    Malformed("superscript digits on an upload", b"PUT /v1/models/x HTTP/1.1\r\n"
              b"Content-Length: \xb9\xb3\r\n\r\n"),
    Malformed("a signed Content-Length", get(b"Content-Length: +0")),
    # The last of two lengths used to win and the rest of the body became a second request.
    Malformed("conflicting Content-Lengths smuggle a request",
              get(b"Content-Length: %d" % len(SMUGGLED), b"Content-Length: 0", body=SMUGGLED)),
    Malformed("a repeated Content-Length", get(b"Content-Length: 0", b"Content-Length: 0")),
    Malformed("a Content-Length list", get(b"Content-Length: 0, 0")),
    Malformed("Transfer-Encoding with Content-Length",
              get(b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(SMUGGLED),
                  body=SMUGGLED)),
    Malformed("a NUL in a header value", get(b"X-Test: a\x00b")),
    Malformed("a control character in a header value", get(b"X-Test: a\x01b")),
    Malformed("DEL in a header value", get(b"X-Test: a\x7fb")),
    Malformed("a bare CR in a header value", get(b"X-Test: a\rb")),
    Malformed("a bare LF in a header value", get(b"X-Test: a\nb")),
    Malformed("a control character in a header name", get(b"X-\x01Test: a")),
    Malformed("two Host headers", get(b"Host: y")),
    Malformed("a control character in the target", b"GET /heal\x01thz HTTP/1.1\r\n\r\n"),
]  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_a_malformed_request_is_400_and_the_connection_closes(
    agent: AgentProcess, case: Malformed
) -> None:
    before = len(agent.log())
    raw, closed = exchange(agent, case.request)
    assert statuses(raw) == [400], raw
    assert closed, "the connection stayed open after a malformed request"
    assert b'"type": "invalid_request_error"' in raw
    logged = agent.log()[before:]
    assert "Traceback" not in logged and "unhandled error" not in logged


def test_a_tab_in_a_header_value_is_accepted(agent: AgentProcess) -> None:
    raw, _ = exchange(agent, get(b"X-Test: a\tb", b"Connection: close"))
    assert statuses(raw) == [200]


def test_a_reset_on_a_keep_alive_connection_is_one_quiet_debug_line(agent: AgentProcess) -> None:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        port = sock.getsockname()[1]
        before = len(agent.log())
        sock.sendall(get() + b"GET /heal")  # a request, and the start of the next one
        answer = b""
        while not answer.endswith(b'{"status": "ok"}'):  # the whole answer: the agent now
            answer += sock.recv(65536)  # waits for the rest of the next request
        # SO_LINGER with a zero timeout: close() sends an RST, as a client that crashed does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer = f"127.0.0.1:{port}"
    lines = agent.wait_for(
        lambda: [
            line
            for line in agent.log()[before:].splitlines()
            if peer in line and f"{peer} GET /healthz 200" not in line  # the access line
        ],
        timeout=5,
    )
    assert len(lines) == 1 and lines[0].startswith("DEBUG "), lines
    assert "Traceback" not in agent.log()[before:]
