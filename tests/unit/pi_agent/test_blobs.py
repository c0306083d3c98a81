"""Peer distribution through real agent processes: ``/v1/blobs/<sha256>`` (whole, ranges, HEAD,
a client that hangs up), the peer token that opens blobs and nothing else, ``POST /v1/models``
with a ``path`` from the incoming folder, and aria2c pulling one model from two agents at once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess

SIZE = 24 * 1024 * 1024 + 7  # more than loopback's socket buffers hold, so a hang-up is mid-way
CONFIG = {"decoder": {"enabled": False}, "store": {"free_space_margin_mib": 0}}


@pytest.fixture(scope="module")
def weights() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def sha(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


def peer_agent(base: Path, weights: bytes | None, peer_token: str) -> AgentProcess:
    """An agent (not started) with the fleet's peer token, holding ``weights`` as version w1."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "peer-token").write_text(peer_token + "\n")
    if weights is not None:
        store = ModelStore(base / "state" / "models")
        store.recover()
        store.install("w1", [weights], hashlib.sha256(weights).hexdigest())
    config = {**CONFIG, "agent": {"peer_token_file": base / "peer-token"}}
    return AgentProcess(base, config)


@pytest.fixture(scope="module")
def peer_token() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, weights: bytes, peer_token: str) -> Iterator[AgentProcess]:
    with peer_agent(tmp_path_factory.mktemp("blobs"), weights, peer_token) as proc:
        yield proc


def get(agent: AgentProcess, path: str, token: str | None = None, **headers: str):
    all_headers = {**agent.headers(token), **{k.replace("_", "-"): v for k, v in headers.items()}}
    return agent.request("GET", path, headers=all_headers, auth=False)


def metric(agent: AgentProcess, sample: str) -> float:
    text = agent.request("GET", "/metrics")[2].decode()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_blob_is_the_whole_file(agent: AgentProcess, weights: bytes, sha: str) -> None:
    status, headers, body = get(agent, f"/v1/blobs/{sha}")
    assert status == 200 and body == weights and hashlib.sha256(body).hexdigest() == sha
    assert headers["content-length"] == str(SIZE)
    assert headers["content-type"] == "application/octet-stream"
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"] == f'"{sha}"'
    assert "content-range" not in headers


@dataclass(frozen=True)
class Span:
    header: str
    first: int
    last: int


SPANS = {
    "a-b": Span("bytes=100-4195", 100, 4195),
    "a-": Span(f"bytes={SIZE - 5000}-", SIZE - 5000, SIZE - 1),
    "-n": Span("bytes=-1234", SIZE - 1234, SIZE - 1),
    "one byte": Span("bytes=0-0", 0, 0),
    "an end past the file": Span(f"bytes=5-{SIZE * 2}", 5, SIZE - 1),
}


@pytest.mark.parametrize("span", SPANS.values(), ids=SPANS.keys())
def test_a_range_is_exactly_those_bytes(
    agent: AgentProcess, weights: bytes, sha: str, span: Span
) -> None:
    status, headers, body = get(agent, f"/v1/blobs/{sha}", Range=span.header)
    assert status == 206
    assert body == weights[span.first : span.last + 1]
    assert headers["content-range"] == f"bytes {span.first}-{span.last}/{SIZE}"
    assert headers["content-length"] == str(span.last - span.first + 1)
    assert headers["etag"] == f'"{sha}"' and headers["accept-ranges"] == "bytes"


def test_several_ranges_get_the_whole_file(agent: AgentProcess, weights: bytes, sha: str) -> None:
    status, headers, body = get(agent, f"/v1/blobs/{sha}", Range="bytes=0-1,10-20")
    assert status == 200 and body == weights and "content-range" not in headers


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
def test_an_unsatisfiable_range_is_416(agent: AgentProcess, sha: str, header: str) -> None:
    status, headers, body = get(agent, f"/v1/blobs/{sha}", Range=header)
    assert status == 416 and headers["content-range"] == f"bytes */{SIZE}"
    assert json.loads(body)["error"]["code"] == 416


def test_head_has_the_headers_and_no_body(agent: AgentProcess, sha: str) -> None:
    request = (
        f"HEAD /v1/blobs/{sha} HTTP/1.1\r\nAuthorization: Bearer {agent.token}\r\n"
        "Range: bytes=0-9\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(request.encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")  # Range applies to GET only
    assert f"Content-Length: {SIZE}".encode() in head and f'ETag: "{sha}"'.encode() in head
    assert body == b""


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/blobs/" + "0" * 64, 404),
        ("/v1/blobs/" + "A" * 64, 400),
        ("/v1/blobs/abc", 400),
        ("/v1/blobs/", 400),
    ],
    ids=["unknown sha256", "upper case", "too short", "empty"],
)
def test_unknown_and_malformed_digests(agent: AgentProcess, path: str, status: int) -> None:
    got, _, body = get(agent, path)
    assert got == status and json.loads(body)["error"]["code"] == status


def test_the_peer_token_opens_blobs_and_nothing_else(
    agent: AgentProcess, peer_token: str, weights: bytes, sha: str
) -> None:
    status, _, body = get(agent, f"/v1/blobs/{sha}", peer_token, Range="bytes=0-99")
    assert status == 206 and body == weights[:100]
    assert agent.request("HEAD", f"/v1/blobs/{sha}", headers=agent.headers(peer_token))[0] == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/models"),
        ("GET", "/v1/status"),
        ("GET", "/metrics"),
        ("GET", "/v1/blobs"),
        (
            "GET",
            f"/v1/blobs/{sha}/../../models",
        ),
    ]:
        status, _, body = agent.request(method, path, headers=agent.headers(peer_token), auth=False)
        assert status == 403, (method, path)
        assert json.loads(body)["error"]["type"] == "permission_error"
    assert get(agent, f"/v1/blobs/{sha}", "x" * 32)[0] == 403
    status, headers, _ = agent.request("GET", f"/v1/blobs/{sha}", auth=False)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert peer_token not in agent.log()


def test_without_a_peer_token_file_only_the_agent_token_works(
    tmp_path: Path, weights: bytes, sha: str
) -> None:
    with AgentProcess(tmp_path, CONFIG) as proc:
        assert get(proc, f"/v1/blobs/{sha}", "")[0] == 401
        assert get(proc, f"/v1/blobs/{sha}", "y" * 32)[0] == 403


def open_files(agent: AgentProcess) -> list[str]:
    """What the agent's file descriptors point at."""
    assert agent.proc is not None
    out = []
    for fd in Path(f"/proc/{agent.proc.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            out.append(str(fd.readlink()))
    return out


def test_a_client_that_hangs_up_mid_transfer_leaks_nothing(
    agent: AgentProcess, weights: bytes, sha: str
) -> None:
    model = str(agent.state_dir / "models" / "versions" / "w1" / "model.gguf")
    before = len(open_files(agent))
    request = f"GET /v1/blobs/{sha} HTTP/1.1\r\nAuthorization: Bearer {agent.token}\r\n\r\n"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
            sock.sendall(request.encode())
            received = 0
            while received < 4096:
                received += len(sock.recv(4096))
            assert model in open_files(agent)  # mid-transfer: the file is open
    agent.wait_for(lambda: model not in open_files(agent) and len(open_files(agent)) <= before)
    assert agent.json("GET", "/healthz") == (200, {"status": "ok"})
    status, _, body = get(agent, f"/v1/blobs/{sha}", Range="bytes=-10")
    assert status == 206 and body == weights[-10:]
    assert "Traceback" not in agent.log()


def test_serving_a_blob_never_holds_it_in_memory(agent: AgentProcess, sha: str) -> None:
    assert agent.proc is not None
    status_file = Path(f"/proc/{agent.proc.pid}/status")

    def peak_mib() -> float:
        match = re.search(r"VmHWM:\s+(\d+) kB", status_file.read_text())
        assert match is not None
        return int(match.group(1)) / 1024

    before = peak_mib()
    for _ in range(2):
        assert get(agent, f"/v1/blobs/{sha}")[0] == 200
    assert peak_mib() - before < SIZE / (1 << 20) / 4  # a whole read would add the 24 MiB
    assert peak_mib() <= 40  # the agent's RSS budget


def test_metrics_count_blob_bytes_and_requests(agent: AgentProcess, sha: str) -> None:
    sent = "pi_agent_blob_bytes_served_total"
    partial = 'pi_agent_blob_requests_total{status="206"}'
    missing = 'pi_agent_blob_requests_total{status="404"}'
    before = (metric(agent, sent), metric(agent, partial), metric(agent, missing))
    assert get(agent, f"/v1/blobs/{sha}", Range="bytes=1000-1999")[0] == 206
    assert agent.request("HEAD", f"/v1/blobs/{sha}")[0] == 200
    assert get(agent, "/v1/blobs/" + "0" * 64)[0] == 404
    after = (metric(agent, sent), metric(agent, partial), metric(agent, missing))
    assert after == (before[0] + 1000, before[1] + 1, before[2] + 1)


def test_sighup_reloads_the_peer_token(tmp_path: Path, weights: bytes, sha: str) -> None:
    with peer_agent(tmp_path, weights, "o" * 32) as proc:
        assert get(proc, f"/v1/blobs/{sha}", "o" * 32, Range="bytes=0-0")[0] == 206
        (tmp_path / "peer-token").write_text("n" * 32)
        proc.signal(signal.SIGHUP)
        proc.wait_for(lambda: get(proc, f"/v1/blobs/{sha}", "n" * 32, Range="bytes=0-0")[0] == 206)
        assert get(proc, f"/v1/blobs/{sha}", "o" * 32, Range="bytes=0-0")[0] == 403


# installing from the incoming folder


def incoming(agent: AgentProcess) -> Path:
    return agent.state_dir / "incoming"


def test_the_agent_makes_its_incoming_folder(agent: AgentProcess) -> None:
    assert incoming(agent).is_dir() and incoming(agent).stat().st_mode & 0o777 == 0o770


def test_install_by_path_moves_the_file_into_the_store(agent: AgentProcess) -> None:
    data = os.urandom(3 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    path = incoming(agent) / f"{sha}.gguf"
    path.write_bytes(data)
    inode = path.stat().st_ino
    status, body = agent.json(
        "POST", "/v1/models", {"version": "p1", "path": str(path), "sha256": sha, "name": "demo"}
    )
    assert status == 201 and body["size"] == len(data) and body["sha256"] == sha
    assert not path.exists()
    model = agent.state_dir / "models" / "versions" / "p1" / "model.gguf"
    assert model.stat().st_ino == inode and model.read_bytes() == data
    listing = agent.json("GET", "/v1/models")[1]["data"]
    assert {"id": "p1", "sha256": sha, "name": "demo"}.items() <= next(
        m for m in listing if m["id"] == "p1"
    ).items()
    assert get(agent, f"/v1/blobs/{sha}")[2] == data  # and the fleet can pull it from here now


def test_install_by_path_with_a_wrong_sha256_removes_the_file(agent: AgentProcess) -> None:
    path = incoming(agent) / "bad.gguf"
    path.write_bytes(b"GGUF-not-this" * 1000)
    status, body = agent.json(
        "POST", "/v1/models", {"version": "p-bad", "path": str(path), "sha256": "1" * 64}
    )
    assert status == 422 and "sha256 mismatch" in body["error"]["message"]
    assert not path.exists()
    assert agent.json("GET", "/v1/models/p-bad")[0] == 404
    versions = agent.state_dir / "models" / "versions"
    assert not [p for p in versions.iterdir() if p.name.startswith(".")]


def test_install_by_path_refuses_other_places_and_links(
    agent: AgentProcess, tmp_path: Path
) -> None:
    data = b"GGUF-outside" * 1000
    sha = hashlib.sha256(data).hexdigest()
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(data)
    link = incoming(agent) / "link.gguf"
    link.symlink_to(outside)
    cases = {
        str(outside): "not directly inside",
        str(incoming(agent) / ".." / "outside.gguf"): "not directly inside",
        str(link): "symlink",
        str(incoming(agent)): "not directly inside",
        "relative.gguf": "does not match",
    }
    for path, message in cases.items():
        status, body = agent.json(
            "POST", "/v1/models", {"version": "p-out", "path": path, "sha256": sha}
        )
        assert status == 400 and message in body["error"]["message"], (path, body)
    assert outside.read_bytes() == data and link.is_symlink()
    assert agent.json("GET", "/v1/models/p-out")[0] == 404
    link.unlink()


@pytest.mark.parametrize(
    "extra",
    [{}, {"url": "http://127.0.0.1:1/x.gguf", "path": "/tmp/x.gguf"}],
    ids=["neither url nor path", "both url and path"],
)
def test_install_needs_exactly_one_of_url_and_path(agent: AgentProcess, extra: dict) -> None:
    status, body = agent.json("POST", "/v1/models", {"version": "p-x", "sha256": "1" * 64, **extra})
    assert status == 400 and "exactly one of url, path" in body["error"]["message"]


# aria2c, as model_sync's peers source runs it


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed (apt: aria2)")
def test_aria2c_pulls_a_model_from_two_agents_into_a_third(
    tmp_path: Path, weights: bytes, sha: str, peer_token: str
) -> None:
    one = peer_agent(tmp_path / "one", weights, peer_token)
    two = peer_agent(tmp_path / "two", weights, peer_token)
    new = peer_agent(tmp_path / "new", None, peer_token)
    with one, two, new:
        done = subprocess.run(
            [
                "aria2c",
                f"--dir={new.state_dir / 'incoming'}",
                f"--out={sha}.gguf",
                f"--header=Authorization: Bearer {peer_token}",
                f"--checksum=sha-256={sha}",
                "--split=4",
                "--min-split-size=1M",
                "--max-connection-per-server=2",  # aria2 takes both 127.0.0.1 agents as one server
                "--max-overall-download-limit=24M",  # a second: long enough for both peers to serve
                "--file-allocation=none",
                "--console-log-level=warn",
                "--summary-interval=0",
                f"{one.url}/v1/blobs/{sha}",
                f"{two.url}/v1/blobs/{sha}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        sent = [metric(peer, "pi_agent_blob_bytes_served_total") for peer in (one, two)]
        assert all(n > 0 for n in sent) and sum(sent) >= SIZE, sent  # both peers served parts
        path = new.state_dir / "incoming" / f"{sha}.gguf"
        status, body = new.json(
            "POST", "/v1/models", {"version": "w1", "path": str(path), "sha256": sha}
        )
        assert status == 201 and body["size"] == SIZE
        assert get(new, f"/v1/blobs/{sha}")[2] == weights
