"""Supervision of one llama-server process (the decoder, or the encoder with ``--embedding``).

The server listens on 127.0.0.1 only. A crash is followed by a restart after ``restart_backoff_s``,
doubling while the process keeps dying young (a crash loop), back to the base delay once a run
lasts ``stable_after_s``. ``state`` is what readiness and metrics report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import time
from pathlib import Path
from typing import Any

from pi_agent import http_client

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for ``port = 0``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG: a kill -9 of the agent takes llama-server with it, so a restarted agent
    # never finds its port taken by an orphan.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def server_args(role: str, section: dict[str, Any], model: Path, port: int) -> list[str]:
    """llama-server's arguments for a role's config section."""
    args = [
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(section["ctx_size"]), "--threads", str(section["threads"]),
        "--batch-size", str(section["batch_size"]), "--ubatch-size", str(section["ubatch_size"]),
        "--metrics", "--no-webui",
    ]  # fmt: skip
    if role == "encoder":
        args += ["--embedding", "--parallel", "1"]
    else:
        args += [
            "--cache-type-k", section["cache_type_k"], "--cache-type-v", section["cache_type_v"],
            "--cache-reuse", str(section["cache_reuse"]), "--parallel", str(section["parallel"]),
        ]  # fmt: skip
        if section["grammar_file"]:
            args += ["--grammar-file", section["grammar_file"]]
    return args + [str(a) for a in section["extra_args"]]


class Supervisor:
    """Keeps one llama-server running; ``state`` is one of ``STATES``."""

    STATES = ("stopped", "starting", "ready", "backoff", "failed")

    def __init__(
        self,
        role: str,
        binary: Path,
        section: dict[str, Any],
        llama: dict[str, Any],
        log_dir: Path,
    ) -> None:
        self.role = role
        self.binary = Path(binary)
        self.section = section
        self.llama = llama
        self.log_dir = Path(log_dir)
        self.model: Path | None = None
        self.port = 0
        self.state = "stopped"
        self.restarts = 0
        self.last_error = ""
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()  # set when a started server dies (probes fail fast)
        self._stopping = False

    # control

    def start(self, model: Path | None) -> None:
        """Start supervising with ``model`` (``None``: stay stopped until a model exists)."""
        self.model = model
        self._stopping = False
        self._exited.clear()
        if model is None:
            self.state = "stopped"
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"supervise-{self.role}")

    async def stop(self) -> None:
        """Stop the server and its supervision."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._terminate()
        self.state = "stopped"
        self._ready.clear()

    async def restart(self, model: Path | None, section: dict[str, Any] | None = None) -> None:
        """Stop, then start with a new model or settings (a switch, a reload)."""
        await self.stop()
        if section is not None:
            self.section = section
        self.start(model)

    async def wait_ready(self, timeout: float, fail_on_exit: bool = False) -> bool:
        """Wait until the server answers its health check (or, optionally, until it dies)."""
        waits = [asyncio.ensure_future(self._ready.wait())]
        if fail_on_exit:
            waits.append(asyncio.ensure_future(self._exited.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._ready.is_set()

    # the loop

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        self.pid = None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a hung (stopped) server takes its SIGTERM now
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            log.warning("%s llama-server ignored SIGTERM for 10 s: killed", self.role)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _spawn(self) -> asyncio.subprocess.Process:
        assert self.model is not None
        self.port = self.section["port"] or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"llama-server-{self.role}.log"
        args = server_args(self.role, self.section, self.model, self.port)
        log.info(
            "starting %s llama-server on 127.0.0.1:%d with %s", self.role, self.port, self.model
        )
        with log_path.open("wb") as log_file:
            return await asyncio.create_subprocess_exec(
                str(self.binary), *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    async def _run(self) -> None:
        delay = self.llama["restart_backoff_s"]
        first = True
        while not self._stopping:
            if not first:
                self.state = "backoff"
                await asyncio.sleep(delay)
                self.restarts += 1
            first = False
            self.state = "starting"
            self._ready.clear()
            self._exited.clear()
            started = time.monotonic()
            try:
                proc = self._proc = await self._spawn()
            except OSError as exc:
                self.last_error = f"cannot start llama-server: {exc}"
                log.error("%s: %s", self.role, self.last_error)
                self.state = "failed"
                delay = min(delay * 2, self.llama["restart_backoff_max_s"])
                continue
            self.pid = proc.pid
            waiter = asyncio.create_task(proc.wait())
            if await self._until_healthy(waiter):
                self.state = "ready"
                self._ready.set()
                log.info("%s llama-server ready (pid %d)", self.role, proc.pid)
            code = await waiter
            self._ready.clear()
            self._exited.set()
            self.pid = None
            if self._stopping:
                break
            lived = time.monotonic() - started
            self.last_error = f"llama-server exited with {code} after {lived:.1f} s"
            log.warning("%s %s", self.role, self.last_error)
            if lived >= self.llama["stable_after_s"]:
                delay = self.llama["restart_backoff_s"]
            else:
                delay = min(
                    delay * 2 if self.restarts else delay, self.llama["restart_backoff_max_s"]
                )

    async def _until_healthy(self, waiter: asyncio.Task[int]) -> bool:
        deadline = time.monotonic() + self.llama["start_timeout_s"]
        while time.monotonic() < deadline and not waiter.done():
            if await self.healthy():
                return True
            await asyncio.wait({waiter}, timeout=0.1)
        if not waiter.done() and self._proc is not None:
            self.last_error = "llama-server did not become healthy in time"
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        return False

    # talking to it

    async def healthy(self) -> bool:
        """Whether llama-server answers ``/health`` with 200."""
        try:
            resp = await http_client.request("127.0.0.1", self.port, "GET", "/health", timeout=2)
            await resp.read()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return False
        return resp.status == 200

    async def call(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 600.0
    ) -> http_client.ClientResponse:
        """One request to the server (raises ``OSError`` when it is down)."""
        if self.state != "ready":
            raise ConnectionError(f"the {self.role} is {self.state}")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return await http_client.request(
            "127.0.0.1", self.port, method, path, body, headers, timeout
        )

    async def scrape(self) -> tuple[str, list[dict[str, Any]]]:
        """llama-server's ``/metrics`` text and ``/slots`` list."""
        metrics = await self.call("GET", "/metrics", timeout=2)
        text = (await metrics.read()).decode()
        slots_resp = await self.call("GET", "/slots", timeout=2)
        slots = json.loads(await slots_resp.read()) if slots_resp.status == 200 else []
        return text, slots if isinstance(slots, list) else []

    async def probe(
        self, prompt: str, max_tokens: int, timeout: float, dims: int | None = None
    ) -> str | None:
        """A real completion (an embedding of ``dims`` numbers for the encoder, when the size
        is known); ``None`` when it works, else why it failed."""
        if not await self.wait_ready(timeout, fail_on_exit=True):
            return f"{self.role} not ready: {self.last_error or self.state}"
        if self.role == "encoder":
            path, payload = "/v1/embeddings", {"input": prompt}
        else:
            path, payload = "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}
        try:
            resp = await self.call("POST", path, json.dumps(payload).encode(), timeout)
            data = json.loads(await resp.read())
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            return f"probe failed: {exc}"
        if resp.status != 200:
            return f"probe answered {resp.status}: {str(data)[:200]}"
        if self.role == "encoder":
            return embedding_failure(data, dims)
        if not data.get("choices"):
            return "probe returned no choices"
        return None


def embedding_failure(data: Any, dims: int | None) -> str | None:
    """Why an OpenAI embeddings answer is not one vector of ``dims`` numbers (``None``: it is)."""
    try:
        vector = data["data"][0]["embedding"]
    except (KeyError, IndexError, TypeError):
        return "probe returned no embedding"
    if not isinstance(vector, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in vector
    ):
        return "probe returned an embedding that is not a list of numbers"
    if dims is not None and len(vector) != dims:
        return f"probe returned a vector of {len(vector)} numbers, not the model's {dims}"
    if not vector or not all(math.isfinite(x) for x in vector) or not any(vector):
        return "probe returned an empty, zero or non-finite vector"
    return None
