"""A small, defensive client of the per-Pi agent's HTTP API (``pi_agent``).

    client = AgentClient("https://10.0.0.11:8470", token="...", ca_file=Path("fleet/ca/ca.pem"))
    status = client.fetch()        # AgentStatus, or AgentError with a one-line reason
    status.model_name, status.ready, status.tg_tok_s, status.temperature_c

Endpoints read (``pi_agent.app``): ``GET /v1/status`` (required), ``GET /readyz`` (200 ready,
503 not ready) and ``GET /v1/bench`` (the last benchmark summary; 404 before the first one).
Every endpoint but ``/healthz`` wants ``Authorization: Bearer <token>``. A field the agent
leaves out, or sends with another type, reads as ``None``: an older or newer agent still shows.
The connection (the fleet's CA, the token, one-line ``AgentError``s) is
``distill.agent_client``'s, shared with ``distill chat``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.agent_client import DEFAULT_TIMEOUT, AgentConnection, AgentError, Tokens, dig

__all__ = ["DEFAULT_TIMEOUT", "AgentClient", "AgentError", "AgentStatus", "Tokens", "parse_status"]


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
        model_name=_text(dig(data, "model", "name")),
        model_version=_text(dig(data, "model", "version")),
        model_sha256=_text(dig(data, "model", "sha256")),
        llama_build=_text(dig(data, "llama_cpp", "build"))
        or _text(dig(data, "llama_cpp", "version")),
        uptime_s=_number(data.get("uptime_s")),
        temperature_c=_number(data.get("temperature_c")),
        throttled_now=_flags(dig(data, "throttled", "now")),
        throttled_since_boot=_flags(dig(data, "throttled", "since_boot")),
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


class AgentClient(AgentConnection):
    """One agent; every call raises ``AgentError`` (never an httpx exception)."""

    def healthy(self) -> bool:
        """``/healthz`` answers 200 (needs no token)."""
        with self.client() as client:
            return self.get(client, "/healthz").status_code == 200

    def fetch(self) -> AgentStatus:
        """Status, readiness and the last benchmark's throughput, in one ``AgentStatus``."""
        with self.client(self._headers) as client:
            response = self.get(client, "/v1/status")
            self.check(response, "/v1/status")
            status = parse_status(self.json(response, "/v1/status"))
            ready = self.get(client, "/readyz")
            ready_flag = {200: True, 503: False}.get(ready.status_code)
            bench = self.get(client, "/v1/bench")
            tg = None
            if bench.status_code == 200:
                try:
                    tg = best_tg(bench.json())
                except ValueError:
                    tg = None
        return AgentStatus(**{**status.__dict__, "ready": ready_flag, "tg_tok_s": tg})
