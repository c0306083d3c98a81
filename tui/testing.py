"""A stand-in pi-agent on 127.0.0.1 (stdlib ``http.server``): for the tests and the screenshots.

    with FakeAgent(status=sample_status("pi-a"), token="s3cret") as agent:
        AgentClient(agent.url, "s3cret").fetch()

It answers ``/healthz``, ``/readyz``, ``/v1/status`` and ``/v1/bench`` the way ``pi_agent.app``
does (bearer token on all but ``/healthz``, ``{"error": {...}}`` bodies), from the dicts it is
given; ``raw_status`` serves bytes as they are, to test what a broken agent sends. A streamed
``POST /v1/chat/completions`` answers ``answer``'s pieces as llama-server's server-sent events,
the last one with its ``usage`` and ``timings`` (``tokens_per_s``); ``chats`` keeps each body.
With ``piece_gap``, the answer waits after its first piece until that event is set.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# An inventory ansible cannot parse (kept out of the tree so yamllint stays clean).
BROKEN_INVENTORY = "all:\n  hosts: [this is: not, valid\n"


def sample_status(host: str, temperature: float = 52.0, throttled: int = 0) -> dict[str, Any]:
    """A ``/v1/status`` body shaped like ``pi_agent.app.Agent.status``'s."""
    flags = ("under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit")
    return {
        "agent": {"version": "0.1.0", "uptime_s": 3600.0, "pid": 4242},
        "host": host,
        "board": "pi5",
        "board_model": "Raspberry Pi 5 Model B Rev 1.0",
        "uptime_s": 86400.0,
        "temperature_c": temperature,
        "throttled": {
            "raw": hex(throttled),
            "source": "sysfs",
            "now": {name: bool(throttled >> bit & 1) for bit, name in enumerate(flags)},
            "since_boot": {n: bool(throttled >> (bit + 16) & 1) for bit, n in enumerate(flags)},
        },
        "zram": [
            {
                "device": "zram0",
                "algorithm": "lz4",
                "disksize": 1 << 30,
                "orig_data_size": 300 << 20,
                "compr_data_size": 100 << 20,
            }
        ],
        "model": {"name": "quebecois-135m", "version": "v3", "sha256": "ab" * 32, "size": 1},
        "llama_cpp": {"build": "0c1e570", "version": "b1"},
        "servers": {"decoder": {"state": "ready", "restarts": 0, "pid": 99, "last_error": None}},
    }


def sample_bench(tg: float, pp: float = 150.0) -> dict[str, Any]:
    """A ``/v1/bench`` summary with one pp and one tg result."""
    return {
        "results": [
            {"test": "pp512", "threads": 4, "tokens_per_second": pp, "predicted": None},
            {"test": "tg128", "threads": 4, "tokens_per_second": tg, "predicted": tg},
        ]
    }


class FakeAgent:
    """A threaded HTTP server answering like a pi-agent; a context manager."""

    def __init__(
        self,
        status: dict[str, Any] | None = None,
        token: str = "token",
        ready: bool = True,
        bench: dict[str, Any] | None = None,
        raw_status: bytes | None = None,
        answer: tuple[str, ...] = ("Salut", ", ça", " va", " bien!"),
        tokens_per_s: float = 12.5,
        piece_gap: threading.Event | None = None,
    ) -> None:
        self.status = status if status is not None else sample_status("fake")
        self.token = token
        self.ready = ready
        self.bench = bench
        self.raw_status = raw_status
        self.answer = answer
        self.tokens_per_s = tokens_per_s
        self.piece_gap = piece_gap
        self.requests: list[tuple[str, str | None]] = []
        self.chats: list[dict[str, Any]] = []
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the TUI's terminal is not for access logs

            def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code: int, message: str) -> None:
                kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found"}
                error = {"message": message, "type": kinds.get(code, "error"), "code": code}
                self._send(code, json.dumps({"error": error}).encode())

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                agent.requests.append((self.path, auth))
                if self.path == "/healthz":
                    return self._send(200, b'{"status": "ok"}')
                if not auth or not auth.startswith("Bearer "):
                    return self._error(401, "missing bearer token")
                if auth.removeprefix("Bearer ").strip() != agent.token:
                    return self._error(403, "invalid bearer token")
                if self.path == "/readyz":
                    body = json.dumps({"ready": agent.ready, "servers": {}}).encode()
                    return self._send(200 if agent.ready else 503, body)
                if self.path == "/v1/status":
                    if agent.raw_status is not None:
                        return self._send(200, agent.raw_status)
                    return self._send(200, json.dumps(agent.status).encode())
                if self.path == "/v1/bench":
                    if agent.bench is None:
                        return self._error(404, "no benchmark has run yet")
                    return self._send(200, json.dumps(agent.bench).encode())
                return self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                auth = self.headers.get("Authorization")
                agent.requests.append((self.path, auth))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if auth != f"Bearer {agent.token}":
                    return self._error(403 if auth else 401, "invalid bearer token")
                if self.path != "/v1/chat/completions" or not body.get("stream"):
                    return self._error(404, f"no route {self.path} (streamed chat only)")
                agent.chats.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                n = len(agent.answer)
                chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]}
                          for piece in agent.answer]  # fmt: skip
                chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                usage = {"completion_tokens": n, "prompt_tokens": 9}
                timings = {"predicted_n": n, "predicted_per_second": agent.tokens_per_s}
                chunks.append({"choices": [], "usage": usage, "timings": timings})
                for i, chunk in enumerate(chunks):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if i == 0 and agent.piece_gap is not None:
                        agent.piece_gap.wait(30)  # a slow Pi: the rest once the test says so
                self.wfile.write(b"data: [DONE]\n\n")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL (ephemeral port)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


async def until(pilot: Any, condition: Any, timeout: float = 20.0) -> None:
    """Let a Textual app under ``run_test()`` run until ``condition()`` holds.

    The one way the TUI tests wait: poll between pilot pauses (never a bare sleep), failing the
    test after ``timeout`` seconds.
    """
    waited = 0.0
    step = 0.02
    while not condition():
        if waited > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await pilot.pause(step)
        waited += step
        step = min(step * 2, 0.2)
