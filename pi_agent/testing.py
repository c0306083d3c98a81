"""Start a real ``pi-agent serve`` process and talk to it: used by the tests and the footprint.

    with AgentProcess(tmp_path, {"decoder": {"enabled": False}}) as agent:
        status, headers, body = agent.request("GET", "/v1/status")

The agent runs as its own process on 127.0.0.1 and an ephemeral port (read back from its log),
with a fresh token and state directory under ``base``. An agent configured with a certificate is
spoken to over HTTPS with ``ssl_context`` (one that trusts the certificate's CA).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_PORT = re.compile(r"listening on https?://[\w.:-]*:(\d+)")


def stub_llama_server(bin_dir: Path, script: Path) -> Path:
    """``bin_dir/llama-server`` that runs ``script`` (a stand-in llama-server) with this Python;
    returns ``bin_dir`` for ``llama.bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    server = bin_dir / "llama-server"
    server.write_text(f"#!{sys.executable}\n" + Path(script).read_text())
    server.chmod(0o755)
    return bin_dir


def agent_with_stub(
    base: Path,
    script: Path,
    weights: dict[str, bytes],
    active: str | None = None,
    config: dict[str, dict[str, Any]] | None = None,
) -> AgentProcess:
    """An agent (not started) whose decoder is the stand-in llama-server ``script``, with these
    versions installed in its store (and ``active`` switched to), probes quick to fail."""
    import hashlib

    from pi_agent.store import ModelStore

    store = ModelStore(base / "state" / "models")
    store.recover()
    for version, data in weights.items():
        store.install(version, [data], hashlib.sha256(data).hexdigest())
    if active is not None:
        store.switch(active)
    merged: dict[str, dict[str, Any]] = {
        "llama": {"bin_dir": stub_llama_server(base / "bin", script), "restart_backoff_s": 0.1},
        "metrics": {"vcgencmd": ""},
        "store": {"keep_versions": 3, "free_space_margin_mib": 0, "probe_timeout_s": 10.0},
    }
    for section, values in (config or {}).items():
        merged.setdefault(section, {}).update(values)
    return AgentProcess(base, merged)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """A two-level dict as TOML (all the agent's config needs)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class AgentProcess:
    """A ``pi-agent serve`` subprocess with its own config, token and state directory."""

    def __init__(
        self,
        base: Path,
        config: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.token_file = self.base / "token"
        self.token_file.write_text(self.token + "\n")
        self.state_dir = self.base / "state"
        merged: dict[str, dict[str, Any]] = {
            "agent": {"port": 0, "token_file": self.token_file, "state_dir": self.state_dir}
        }
        for section, values in (config or {}).items():
            merged.setdefault(section, {}).update(values)
        self.config_path = self.base / "agent.toml"
        self.config_path.write_text(to_toml(merged))
        self.log_path = self.base / "agent.log"
        self.env = env
        self.start_timeout = start_timeout
        self.ssl_context = ssl_context
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> AgentProcess:
        """Start the agent and wait until it listens."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pi_agent.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=self.env,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            match = _PORT.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pi-agent did not start:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        """Base URL."""
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        """The Authorization header with the agent's token (or ``token``)."""
        return {"Authorization": f"Bearer {token if token is not None else self.token}"}

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; a dict or list body is sent as JSON."""
        all_headers = dict(self.headers() if auth else {})
        raw = body
        if isinstance(body, dict | list):
            raw = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=raw, headers=all_headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        """A new connection to the agent (HTTPS with ``ssl_context`` when it is set)."""
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """One request; the answer parsed as JSON."""
        status, _, raw = self.request(method, path, body, **kwargs)
        return status, json.loads(raw) if raw else None

    def wait_for(self, condition: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
        """Poll ``condition()`` until it is truthy; its value, or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout} s; log:\n{self.log()[-2000:]}")
            time.sleep(interval)

    def signal(self, signum: int) -> None:
        """Send a signal to the agent."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait (SIGKILL if it hangs); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def upload(self, version: str, size: int, sha256: str, name: str = "") -> Upload:
        """A ``PUT /v1/models/<version>`` whose body the caller sends piece by piece."""
        return Upload(self, version, size, sha256, name)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Upload:
    """A model upload over a raw socket, its body sent when and as the caller chooses (tests pause
    it); the agent may answer before the body ends, so sending never fails."""

    def __init__(self, agent: AgentProcess, version: str, size: int, sha256: str, name: str):
        query = f"sha256={sha256}" + (f"&name={name}" if name else "")
        head = (
            f"PUT /v1/models/{version}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {agent.token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        self.sock = socket.create_connection(("127.0.0.1", agent.port), timeout=60)
        if agent.ssl_context is not None:
            self.sock = agent.ssl_context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        """More of the body (dropped when the agent has answered and closed)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def response(self) -> tuple[int, Any]:
        """The status and the JSON body of the answer."""
        raw = b""
        with self.sock, contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
            while chunk := self.sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, json.loads(body) if body else None
