"""A small, defensive client of the per-Pi agent's HTTP API (``pi_agent``).

    client = AgentClient("https://10.0.0.11:8470", token="...", ca_file=Path("fleet/ca/ca.pem"))
    status = client.fetch()        # AgentStatus, or AgentError with a one-line reason
    status.model_name, status.ready, status.tg_tok_s, status.temperature_c

Endpoints read (``pi_agent.app``): ``GET /v1/status`` (required), ``GET /readyz`` (200 ready,
503 not ready) and ``GET /v1/bench`` (the last benchmark summary; 404 before the first one).
Every endpoint but ``/healthz`` wants ``Authorization: Bearer <token>``. A field the agent
leaves out, or sends with another type, reads as ``None``: an older or newer agent still shows.
An https agent is verified against ``ca_file`` (the fleet's CA, which signed each agent's
certificate), else against the system's CAs; a certificate it cannot verify is an ``AgentError``
that says so, and no token is sent.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT = 3.0


class AgentError(Exception):
    """The agent could not be asked; the message is one line for the fleet table."""


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class AgentStatus:
    """What the fleet screen shows about one agent."""

    host: str | None = None
    board: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    llama_build: str | None = None
    uptime_s: float | None = None
    temperature_c: float | None = None
    throttled_now: tuple[str, ...] = ()
    throttled_since_boot: tuple[str, ...] = ()
    zram: str | None = None
    ready: bool | None = None
    tg_tok_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def throttling(self) -> str:
        """``"none"``, or the flags set now (then those seen since boot, in brackets)."""
        if self.throttled_now:
            return ",".join(self.throttled_now)
        if self.throttled_since_boot:
            return "(" + ",".join(self.throttled_since_boot) + ")"
        return "none" if self.raw.get("throttled") else "?"


def _flags(section: Any) -> tuple[str, ...]:
    if not isinstance(section, dict):
        return ()
    return tuple(sorted(name for name, on in section.items() if on is True))


def _zram(devices: Any) -> str | None:
    """``lz4 1.0G 2.9x`` for the first device (``+N`` when there are more)."""
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        return None if not isinstance(devices, list) else "off"
    first = devices[0]
    parts = [str(first.get("algorithm") or "?")]
    size = _number(first.get("disksize"))
    if size:
        parts.append(f"{size / 2**30:.1f}G")
    orig, compr = _number(first.get("orig_data_size")), _number(first.get("compr_data_size"))
    if orig and compr:
        parts.append(f"{orig / compr:.1f}x")
    if len(devices) > 1:
        parts.append(f"+{len(devices) - 1}")
    return " ".join(parts)


def parse_status(data: Any) -> AgentStatus:
    """An ``AgentStatus`` from ``/v1/status`` JSON, tolerant of missing or odd fields."""
    if not isinstance(data, dict):
        raise AgentError("/v1/status: expected a JSON object")
    return AgentStatus(
        host=_text(data.get("host")),
        board=_text(data.get("board")),
        model_name=_text(_dig(data, "model", "name")),
        model_version=_text(_dig(data, "model", "version")),
        model_sha256=_text(_dig(data, "model", "sha256")),
        llama_build=_text(_dig(data, "llama_cpp", "build"))
        or _text(_dig(data, "llama_cpp", "version")),
        uptime_s=_number(data.get("uptime_s")),
        temperature_c=_number(data.get("temperature_c")),
        throttled_now=_flags(_dig(data, "throttled", "now")),
        throttled_since_boot=_flags(_dig(data, "throttled", "since_boot")),
        zram=_zram(data.get("zram")),
        raw=data,
    )


def best_tg(summary: Any) -> float | None:
    """The best generation throughput (``tg*`` tests) in a ``/v1/bench`` summary."""
    results = summary.get("results") if isinstance(summary, dict) else None
    if not isinstance(results, list):
        return None
    rates = [
        _number(r.get("tokens_per_second"))
        for r in results
        if isinstance(r, dict) and str(r.get("test", "")).startswith("tg")
    ]
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


class AgentClient:
    """One agent; every call raises ``AgentError`` (never an httpx exception)."""

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

    def _client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """An httpx client that verifies the agent against ``ca_file`` (else the system's CAs)."""
        try:
            verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or err
            raise AgentError(f"CA file {self.ca_file}: {reason}") from None
        return httpx.Client(timeout=self.timeout, headers=headers, verify=verify)

    def _get(self, client: httpx.Client, path: str) -> httpx.Response:
        try:
            return client.get(self.base_url + path)
        except httpx.TimeoutException:
            raise AgentError(f"no answer within {self.timeout:g}s") from None
        except httpx.ConnectError as err:
            if _untrusted(err):
                trust = f"the CA in {self.ca_file}" if self.ca_file else "the system's CAs"
                raise AgentError(
                    f"certificate not trusted ({_reason(err)}): not signed by {trust} or not "
                    "for this address (see --ca-file)"
                ) from None
            raise AgentError(f"unreachable: {_reason(err)}") from None
        except httpx.HTTPError as err:
            raise AgentError(f"{type(err).__name__}: {_reason(err)}") from None

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise AgentError(f"{path}: answer is not JSON") from None

    def _check(self, response: httpx.Response, path: str) -> None:
        if response.status_code in (401, 403):
            detail = _error_message(response) or response.reason_phrase
            hint = "" if "Authorization" in self._headers else " (no token: see --token-file)"
            raise AgentError(f"token refused ({response.status_code}: {detail}){hint}")
        if response.status_code != 200:
            detail = _error_message(response) or response.reason_phrase
            raise AgentError(f"{path}: HTTP {response.status_code} {detail}")

    def healthy(self) -> bool:
        """``/healthz`` answers 200 (needs no token)."""
        with self._client() as client:
            return self._get(client, "/healthz").status_code == 200

    def fetch(self) -> AgentStatus:
        """Status, readiness and the last benchmark's throughput, in one ``AgentStatus``."""
        with self._client(self._headers) as client:
            response = self._get(client, "/v1/status")
            self._check(response, "/v1/status")
            status = parse_status(self._json(response, "/v1/status"))
            ready = self._get(client, "/readyz")
            ready_flag = {200: True, 503: False}.get(ready.status_code)
            bench = self._get(client, "/v1/bench")
            tg = None
            if bench.status_code == 200:
                try:
                    tg = best_tg(bench.json())
                except ValueError:
                    tg = None
        return AgentStatus(**{**status.__dict__, "ready": ready_flag, "tg_tok_s": tg})


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


def _error_message(response: httpx.Response) -> str:
    """The agent's ``{"error": {"message": ...}}``, if that is what it sent."""
    try:
        message = _dig(response.json(), "error", "message")
    except ValueError:
        return ""
    return message if isinstance(message, str) else ""


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
