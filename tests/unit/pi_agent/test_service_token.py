"""The fleet's service token (the gateway's and Prometheus's) through a real agent process:
inference and reads open, model changes, benchmarks and blobs refused, renewed on SIGHUP."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pi_agent.app import SERVICE_ROUTES
from pi_agent.config import ConfigError, load, read_tokens
from pi_agent.testing import AgentProcess

SERVICE = "s" * 40
CONFIG = {"decoder": {"enabled": False}, "encoder": {"enabled": False}}
SHA = "0" * 64

# What the service token must never do, with what a right token would get past authentication.
REFUSED = [
    ("POST", "/v1/models", {"url": "https://example.invalid/m.gguf", "sha256": SHA}),
    ("POST", "/v1/models/rollback", None),
    ("POST", "/v1/encoder/models", {"url": "https://example.invalid/m.gguf", "sha256": SHA}),
    ("POST", "/v1/bench", {}),
    ("GET", "/v1/bench", None),
    ("GET", "/v1/bench/csv", None),
    ("GET", "/v1/models/v1", None),
    ("DELETE", "/v1/models/v1", None),
    ("POST", "/v1/models/v1/activate", None),
    ("GET", f"/v1/blobs/{SHA}", None),
]


def service_agent(base: Path, token: str = SERVICE) -> AgentProcess:
    base.mkdir(parents=True, exist_ok=True)
    (base / "service-token").write_text(token + "\n")
    config = {**CONFIG, "agent": {"service_token_file": base / "service-token"}}
    return AgentProcess(base, config)


def test_the_service_token_opens_inference_and_reads_only(tmp_path: Path) -> None:
    with service_agent(tmp_path) as agent:
        headers = agent.headers(SERVICE)
        assert agent.request("GET", "/metrics", headers=headers, auth=False)[0] == 200
        assert agent.request("GET", "/v1/status", headers=headers, auth=False)[0] == 200
        assert agent.request("GET", "/v1/models", headers=headers, auth=False)[0] == 200
        # Not ready (no model): 503 from the route itself, not a refusal.
        assert agent.request("GET", "/readyz", headers=headers, auth=False)[0] == 503
        body = {"messages": [{"role": "user", "content": "Allô"}]}
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            payload = {"input": "Allô"} if path.endswith("embeddings") else body
            status, _, raw = agent.request("POST", path, payload, headers, auth=False)
            # No model is served here: the route's own answer, past authentication.
            assert status not in (401, 403), (path, raw)
        for method, path, payload in REFUSED:
            status, _, raw = agent.request(method, path, payload, headers=headers, auth=False)
            assert status == 403, (method, path, status)
            assert json.loads(raw)["error"]["type"] == "permission_error"
            # The agent's own token gets past authentication on the same request.
            assert agent.request(method, path, payload)[0] != 403, (method, path)
        assert SERVICE not in agent.log()


def test_a_new_service_token_replaces_the_old_on_sighup(tmp_path: Path) -> None:
    with service_agent(tmp_path) as agent:
        new = "t" * 40
        (tmp_path / "service-token").write_text(new + "\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for(
            lambda: (
                agent.request("GET", "/metrics", headers=agent.headers(new), auth=False)[0] == 200
            )
        )
        old = agent.headers(SERVICE)
        assert agent.request("GET", "/metrics", headers=old, auth=False)[0] == 403


def test_without_a_service_token_file_the_service_token_is_refused(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, CONFIG) as agent:
        service = agent.headers(SERVICE)
        assert agent.request("GET", "/metrics", headers=service, auth=False)[0] == 403


def test_the_service_routes_are_all_routes_of_the_agent() -> None:
    from pi_agent.openapi import document

    paths = document()["paths"]
    for method, path in SERVICE_ROUTES:
        assert method.lower() in paths[path], (method, path)


def test_tokens_must_differ(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a" * 32 + "\n")
    (tmp_path / "service").write_text("a" * 32 + "\n")
    (tmp_path / "agent.toml").write_text(
        f"[agent]\ntoken_file = '{tmp_path / 'token'}'\n"
        f"service_token_file = '{tmp_path / 'service'}'\n"
    )
    cfg = load(tmp_path / "agent.toml")
    with pytest.raises(ConfigError, match="different tokens"):
        read_tokens(cfg)
    (tmp_path / "service").write_text("short\n")
    with pytest.raises(ConfigError, match=r"agent\.service_token_file .* at least 16"):
        read_tokens(cfg)
    (tmp_path / "service").write_text("b" * 32 + "\n")
    assert read_tokens(cfg).service == "b" * 32
