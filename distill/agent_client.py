"""Talking to a per-Pi agent over HTTPS: the fleet's CA, the bearer token, one-line errors, and a
streamed chat completion.

    connection = AgentConnection("https://10.0.0.11:8470", token="...", ca_file=fleet_ca())
    for piece in connection.stream_chat({"messages": [{"role": "user", "content": "Salut"}]}):
        if isinstance(piece, str):
            print(piece, end="")          # the answer, as it is generated
        else:
            print(piece.tokens_per_s)     # ChatStats, once, at the end

Shared by ``distill chat`` and ``fleet-tui`` (whose ``tui.agent.AgentClient`` builds on
:class:`AgentConnection`); it lives here because ``tui`` imports ``distill``, never the reverse.
An https agent is verified against ``ca_file`` (the fleet's CA, which signed each agent's
certificate), else against the system's CAs; a certificate that does not verify is an
``AgentError`` that says so, and the token is never sent. Every failure is an ``AgentError``
whose message is one line, never an httpx exception.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT = 3.0
# A generation on a Pi may take a while before its first token (prompt processing, a busy slot).
CHAT_TIMEOUT = 120.0


class AgentError(Exception):
    """The agent could not be asked; the message is one line (a table cell, a CLI error)."""


def fleet_dir(project_dir: Path | None = None) -> Path:
    """The workstation's fleet folder the pi_agent role fills (``ca/ca.pem``, ``tokens/<host>``):
    ``$PIDISTILL_CACHE_DIR/fleet``, else ``<project>/.cache/fleet`` (the current directory)."""
    cache = os.environ.get("PIDISTILL_CACHE_DIR") or (project_dir or Path.cwd()) / ".cache"
    return Path(cache) / "fleet"


def fleet_ca(project_dir: Path | None = None) -> Path | None:
    """The fleet's CA certificate when the pi_agent role has made it, else ``None``."""
    path = fleet_dir(project_dir) / "ca" / "ca.pem"
    return path if path.is_file() else None


@dataclass(frozen=True)
class Tokens:
    """Where bearer tokens come from: ``<dir>/<host>`` first, then one file for the fleet."""

    token_file: Path | None = None
    token_dir: Path | None = None

    def for_host(self, host: str) -> str | None:
        """The token for ``host`` (``None`` when none is configured); AgentError if unreadable."""
        candidates = []
        if self.token_dir is not None:
            candidates.append(self.token_dir / host)
        if self.token_file is not None:
            candidates.append(self.token_file)
        for path in candidates:
            if path is self.token_file or path.is_file():
                try:
                    return path.read_text(encoding="utf-8").strip() or None
                except OSError as err:
                    raise AgentError(f"token file {path}: {err.strerror or err}") from None
        return None


@dataclass(frozen=True)
class ChatStats:
    """How one streamed answer went.

    ``tokens_per_s`` is llama-server's own generation rate on the Pi (``timings``) when it sent
    one, else the tokens over the seconds from the first to the last streamed piece.
    """

    completion_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    seconds: float
    tokens_per_s: float | None
    finish_reason: str | None

    def line(self) -> str:
        """``8 tokens, 12.3 tok/s, 0.9 s (prompt 38, 30 cached)`` for a status bar."""
        rate = f"{self.tokens_per_s:.1f} tok/s" if self.tokens_per_s is not None else "? tok/s"
        parts = [f"{self.completion_tokens} tokens, {rate}, {self.seconds:.1f} s"]
        if self.prompt_tokens is not None:
            cached = f", {self.cached_tokens} cached" if self.cached_tokens else ""
            parts.append(f"(prompt {self.prompt_tokens}{cached})")
        if self.finish_reason == "length":
            parts.append("[cut at max tokens]")
        return " ".join(parts)


def dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or ``None`` where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AgentConnection:
    """One agent's address, token and trust; :meth:`client` opens verified connections."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: Path | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.ca_file = ca_file
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """An httpx client that verifies the agent against ``ca_file`` (else the system's CAs)."""
        try:
            verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or err
            raise AgentError(f"CA file {self.ca_file}: {reason}") from None
        return httpx.Client(timeout=self.timeout, headers=headers, verify=verify)

    def failure(self, err: httpx.HTTPError) -> AgentError:
        """An httpx failure as one line: timeout, untrusted certificate, unreachable."""
        if isinstance(err, httpx.TimeoutException):
            return AgentError(f"no answer within {self.timeout:g}s")
        if isinstance(err, httpx.ConnectError):
            if _untrusted(err):
                trust = f"the CA in {self.ca_file}" if self.ca_file else "the system's CAs"
                return AgentError(
                    f"certificate not trusted ({_reason(err)}): not signed by {trust} or not "
                    "for this address (see --ca-file)"
                )
            return AgentError(f"unreachable: {_reason(err)}")
        return AgentError(f"{type(err).__name__}: {_reason(err)}")

    def get(self, client: httpx.Client, path: str) -> httpx.Response:
        """``GET path``; AgentError when there is no answer."""
        try:
            return client.get(self.base_url + path)
        except httpx.HTTPError as err:
            raise self.failure(err) from None

    def json(self, response: httpx.Response, path: str) -> Any:
        """The answer's JSON; AgentError when it is not JSON."""
        try:
            return response.json()
        except ValueError:
            raise AgentError(f"{path}: answer is not JSON") from None

    def check(self, response: httpx.Response, path: str) -> None:
        """AgentError unless the answer is a 200 (a refused token says where tokens come from)."""
        if response.status_code in (401, 403):
            detail = error_message(response) or response.reason_phrase
            hint = "" if "Authorization" in self._headers else " (no token: see --token-file)"
            raise AgentError(f"token refused ({response.status_code}: {detail}){hint}")
        if response.status_code != 200:
            detail = error_message(response) or response.reason_phrase
            raise AgentError(f"{path}: HTTP {response.status_code} {detail}")

    def stream_chat(self, body: dict[str, Any]) -> Iterator[str | ChatStats]:
        """``POST /v1/chat/completions`` with ``stream: true``: each piece of the answer as it
        comes, then one :class:`ChatStats`. ``body`` is an OpenAI chat request (messages and
        sampling settings); usage is asked for so that the counts are the server's own."""
        path = "/v1/chat/completions"
        request = {**body, "stream": True, "stream_options": {"include_usage": True}}
        headers = {**self._headers, "Accept": "text/event-stream"}
        started = time.monotonic()
        first = last = None
        pieces = 0
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        finish: str | None = None
        with self.client(headers) as client:
            try:
                with client.stream("POST", self.base_url + path, json=request) as response:
                    if response.status_code != 200:
                        response.read()
                        self.check(response, path)
                    for data in _events(response.iter_lines()):
                        if data == "[DONE]":
                            break
                        try:
                            chunk = json.loads(data)
                        except ValueError:
                            raise AgentError(f"{path}: a streamed event is not JSON") from None
                        if isinstance(chunk.get("error"), dict):
                            raise AgentError(f"{path}: {dig(chunk, 'error', 'message')}")
                        usage = chunk.get("usage") or usage
                        timings = chunk.get("timings") or timings
                        for choice in chunk.get("choices") or []:
                            finish = choice.get("finish_reason") or finish
                            text = dig(choice, "delta", "content")
                            if isinstance(text, str) and text:
                                last = time.monotonic()
                                first = first or last
                                pieces += 1
                                yield text
            except httpx.HTTPError as err:
                raise self.failure(err) from None
        elapsed = time.monotonic() - started
        tokens = _int(usage.get("completion_tokens")) or pieces
        rate = timings.get("predicted_per_second")
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
            span = (last - first) if first is not None and last is not None else 0.0
            # The first piece starts the clock: the rate counts the pieces after it.
            rate = (pieces - 1) / span if pieces > 1 and span > 0 else None
        yield ChatStats(
            completion_tokens=tokens,
            prompt_tokens=_int(usage.get("prompt_tokens")),
            cached_tokens=_int(dig(usage, "prompt_tokens_details", "cached_tokens")),
            seconds=elapsed,
            tokens_per_s=float(rate) if rate is not None else None,
            finish_reason=finish,
        )


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (one line each, as llama-server's)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def _untrusted(err: BaseException) -> bool:
    """Whether a connection failed because the agent's certificate did not verify."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(err)


def _reason(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0]


def error_message(response: httpx.Response) -> str:
    """The agent's ``{"error": {"message": ...}}``, if that is what it sent."""
    try:
        message = dig(response.json(), "error", "message")
    except ValueError:
        return ""
    return message if isinstance(message, str) else ""
