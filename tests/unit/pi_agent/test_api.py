"""The API of a real agent process without a model: auth, errors, limits, status, metrics,
the model store over HTTP, reload, stop and sd_notify."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pi_agent.testing import AgentProcess

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi_agent"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    config = {
        "agent": {"root": FIXTURES / "pi5" / "root", "max_body_bytes": 4096},
        "decoder": {"enabled": False},
        "metrics": {"vcgencmd": ""},
        "store": {"keep_versions": 2, "free_space_margin_mib": 0},
    }
    with AgentProcess(tmp_path_factory.mktemp("agent"), config) as proc:
        yield proc


def test_healthz_needs_no_token(agent: AgentProcess) -> None:
    assert agent.json("GET", "/healthz", auth=False) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "path", ["/v1/status", "/metrics", "/readyz", "/openapi.json", "/v1/models", "/nowhere"]
)
def test_every_other_endpoint_needs_the_token(agent: AgentProcess, path: str) -> None:
    status, headers, body = agent.request("GET", path, auth=False)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == 401
    status, _, body = agent.request("GET", path, headers=agent.headers("x" * 32))
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"


def test_the_token_never_reaches_the_log(agent: AgentProcess) -> None:
    agent.request("GET", "/v1/status", headers=agent.headers("wrong-token-value-123"))
    assert agent.token not in agent.log() and "wrong-token-value-123" not in agent.log()


def test_errors_are_json_never_tracebacks(agent: AgentProcess) -> None:
    cases = [
        ("GET", "/nowhere", None, {}, 404),
        ("DELETE", "/v1/status", None, {}, 405),
        ("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/v1/chat/completions", b"x=1", {"Content-Type": "text/plain"}, 415),
        (
            "POST",
            "/v1/chat/completions",
            b"{}" + b" " * 5000,
            {"Content-Type": "application/json"},
            413,
        ),
        ("POST", "/v1/chat/completions", {"messages": []}, {}, 400),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "salut"}]},
            {},
            404,
        ),  # no decoder here
    ]
    for method, path, body, headers, expected in cases:
        status, _, raw = agent.request(method, path, body, headers=headers)
        assert status == expected, (method, path, raw)
        error = json.loads(raw)["error"]
        assert error["code"] == expected and "Traceback" not in error["message"]


def test_malformed_requests_get_4xx(agent: AgentProcess) -> None:
    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            sock.sendall(data)
            return sock.recv(65536)

    assert raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505")
    huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    assert raw(huge).startswith(b"HTTP/1.1 431")
    chunked = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw(chunked).startswith(b"HTTP/1.1 411")


def test_keep_alive_serves_several_requests_on_one_connection(agent: AgentProcess) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status": "ok"}'
    conn.close()


def test_status_reports_the_board_and_host(agent: AgentProcess) -> None:
    status, body = agent.json("GET", "/v1/status")
    assert status == 200
    assert body["board"] == "pi5" and body["board_model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert body["host"] == "pi5-lab-02" and body["temperature_c"] == 52.65
    assert body["throttled"]["raw"] == "0x0" and body["zram"][0]["algorithm"] == "zstd"
    assert body["uptime_s"] == 12345.67 and body["agent"]["uptime_s"] >= 0


def test_readyz_is_503_without_a_model(agent: AgentProcess) -> None:
    status, body = agent.json("GET", "/readyz")
    assert status == 503 and body["ready"] is False


def test_metrics_page_is_prometheus_text(agent: AgentProcess) -> None:
    status, headers, body = agent.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'pi_agent_board_info{model="Raspberry Pi 5 Model B Rev 1.0",board="pi5"} 1' in text
    assert 'pi_agent_scrape_collector_success{collector="zram"} 1' in text
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_openapi_document_is_served(agent: AgentProcess) -> None:
    status, doc = agent.json("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert "/v1/chat/completions" in doc["paths"]


def upload(agent: AgentProcess, version: str, data: bytes, sha: str | None = None):
    sha = sha or hashlib.sha256(data).hexdigest()
    return agent.request(
        "PUT",
        f"/v1/models/{version}?sha256={sha}&name=demo",
        data,
        headers={"Content-Type": "application/octet-stream"},
    )


def test_model_versions_upload_switch_rollback_delete(agent: AgentProcess) -> None:
    one, two = b"GGUF-one" * 1000, b"GGUF-two" * 1000
    assert upload(agent, "bad", one, sha="0" * 64)[0] == 422
    assert upload(agent, "m1", one)[0] == 201
    assert upload(agent, "m1", one)[0] == 409
    assert upload(agent, "m2", two)[0] == 201
    assert agent.json("POST", "/v1/models/m1/activate")[0] == 200
    status, body = agent.json("POST", "/v1/models/m2/activate")
    assert status == 200 and body == {
        "active": "m2",
        "previous": "m1",
        "pruned": [],
        "sha256": hashlib.sha256(two).hexdigest(),
    }
    status, listing = agent.json("GET", "/v1/models")
    assert [(m["id"], m["active"]) for m in listing["data"]] == [("m1", False), ("m2", True)]
    assert agent.json("DELETE", "/v1/models/m2")[0] == 409  # active
    assert agent.json("POST", "/v1/models/rollback")[1]["active"] == "m1"
    assert agent.json("GET", "/v1/models/m1")[1]["active"] is True
    assert agent.json("GET", "/v1/models/zzz")[0] == 404


def test_install_from_a_url_verified_by_sha256(agent: AgentProcess, tmp_path: Path) -> None:
    data = b"GGUF-url" * 2000
    (tmp_path / "model.gguf").write_bytes(data)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.gguf"
        sha = hashlib.sha256(data).hexdigest()
        status, body = agent.json(
            "POST", "/v1/models", {"version": "u1", "url": url, "sha256": "1" * 64}
        )
        assert status == 422 and "sha256 mismatch" in body["error"]["message"]
        status, body = agent.json(
            "POST", "/v1/models", {"version": "u1", "url": url, "sha256": sha}
        )
        assert status == 201 and body["size"] == len(data)
        status, body = agent.json(
            "POST", "/v1/models", {"version": "u2", "url": url + "x", "sha256": sha}
        )
        assert status == 422
    finally:
        server.shutdown()
        server.server_close()


def test_sighup_reloads_the_token_and_sigterm_stops(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, {"decoder": {"enabled": False}}) as proc:
        assert proc.request("GET", "/v1/status")[0] == 200
        old = proc.token
        new = "n" * 32
        proc.token_file.write_text(new)
        proc.signal(signal.SIGHUP)
        proc.wait_for(
            lambda: (
                proc.request("GET", "/v1/status", headers=proc.headers(new), auth=False)[0] == 200
            )
        )
        assert proc.request("GET", "/v1/status", headers=proc.headers(old), auth=False)[0] == 403
        assert proc.stop() == 0


def test_bad_config_on_sighup_keeps_the_running_one(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, {"decoder": {"enabled": False}}) as proc:
        proc.config_path.write_text(proc.config_path.read_text() + "[decoder]\nbogus = 1\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for(lambda: "reload refused" in proc.log())
        assert proc.request("GET", "/v1/status")[0] == 200


def test_sd_notify_ready_and_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        with AgentProcess(tmp_path / "a", {"decoder": {"enabled": False}}, env=env):
            messages = [sock.recv(1024).decode() for _ in range(3)]
    assert any(m.startswith("READY=1") for m in messages)
    assert "WATCHDOG=1" in messages


def test_a_display_name_longer_than_128_characters_is_refused(agent: AgentProcess) -> None:
    data = b"GGUF-name" * 100
    sha = hashlib.sha256(data).hexdigest()
    headers = {"Content-Type": "application/octet-stream"}
    status, _, raw = agent.request(
        "PUT", f"/v1/models/n1?sha256={sha}&name={'n' * 129}", data, headers=headers
    )
    assert status == 400 and "longer than 128" in json.loads(raw)["error"]["message"]
    assert agent.json("GET", "/v1/models/n1")[0] == 404
    status, _, raw = agent.request(
        "PUT", f"/v1/models/n1?sha256={sha}&name={'n' * 128}", data, headers=headers
    )
    assert status == 201 and json.loads(raw)["name"] == "n" * 128


def test_credentials_in_an_install_url_are_used_but_never_shown(
    agent: AgentProcess, tmp_path: Path
) -> None:
    data = b"GGUF-private" * 1000
    (tmp_path / "model.gguf").write_bytes(data)
    seen: list[str | None] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://fleet:s3cr3t-pw@127.0.0.1:{server.server_address[1]}"
        sha = hashlib.sha256(data).hexdigest()
        status, body = agent.json(
            "POST", "/v1/models", {"version": "c1", "url": f"{base}/missing", "sha256": sha}
        )
        assert status == 422 and "***@127.0.0.1" in body["error"]["message"], body
        status, body = agent.json(
            "POST", "/v1/models", {"version": "c1", "url": f"{base}/model.gguf", "sha256": sha}
        )
        assert status == 201, body
        assert body["source"] == f"http://***@127.0.0.1:{server.server_address[1]}/model.gguf"
        assert seen == ["Basic ZmxlZXQ6czNjcjN0LXB3"] * 2  # fleet:s3cr3t-pw
        manifest = agent.state_dir / "models" / "versions" / "c1" / "manifest.json"
        for text in (json.dumps(body), manifest.read_text(), agent.log()):
            assert "s3cr3t" not in text
    finally:
        server.shutdown()
        server.server_close()
