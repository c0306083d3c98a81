"""HTTPS on real agent processes: a throwaway CA and host certificates made with the ``openssl``
command line, clients that trust the CA or not, a plain-HTTP request to the TLS port, the refusal
to serve plain HTTP off loopback, blobs over TLS (whole and ranged), the certificate reloaded on
SIGHUP, and the agent's own downloads verified against ``agent.tls_ca``."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pi_agent import tls
from pi_agent.config import load
from pi_agent.testing import AgentProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

CONFIG = {"decoder": {"enabled": False}, "store": {"free_space_margin_mib": 0}}
SIZE = 3 * 1024 * 1024 + 11  # several of the server's 1 MiB slices, and a ragged end


@dataclass(frozen=True)
class Pki:
    """A CA and one host certificate it signed (for 127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path

    def client(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca))


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def make_pki(base: Path) -> Pki:
    """A throwaway CA and a host certificate, with EC keys (quick to make)."""
    base.mkdir(parents=True, exist_ok=True)
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=pidistill test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=base)  # fmt: skip
    openssl("req", *curve, "-keyout", "host.key", "-out", "host.csr", "-subj", "/CN=localhost",
            cwd=base)  # fmt: skip
    (base / "host.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "host.pem", "-days", "2", "-extfile", "host.ext",
            cwd=base)  # fmt: skip
    return Pki(base / "ca.pem", base / "host.pem", base / "host.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, **agent: object) -> dict[str, dict[str, object]]:
    return {**CONFIG, "agent": {"tls_cert": pki.cert, "tls_key": pki.key, **agent}}


@pytest.fixture(scope="module")
def agent(tmp_path_factory, pki: Pki) -> Iterator[AgentProcess]:
    with AgentProcess(
        tmp_path_factory.mktemp("tls"), tls_config(pki), ssl_context=pki.client()
    ) as proc:
        yield proc


def https(agent: AgentProcess, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", agent.port, context=context, timeout=10)


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None):
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_a_client_that_trusts_the_ca_gets_healthz_and_status(agent: AgentProcess, pki: Pki):
    conn = https(agent, pki.client())
    try:
        status, _, body = get(conn, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        # the same connection, kept alive: the token opens /v1/status
        status, _, body = get(conn, "/v1/status", agent.headers())
        assert status == 200 and json.loads(body)["agent"]["pid"] == agent.proc.pid
        assert get(conn, "/v1/status")[0] == 401
    finally:
        conn.close()
    assert "listening on https://" in agent.log()


def test_a_client_that_does_not_trust_the_ca_fails_verification(agent: AgentProcess) -> None:
    conn = https(agent, ssl.create_default_context())  # the system's CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        get(conn, "/healthz")
    conn.close()


def test_plain_http_to_the_tls_port_gets_no_answer(agent: AgentProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(conn, "/healthz")
    conn.close()
    # and the agent is still serving, without a traceback for it
    assert agent.request("GET", "/healthz")[0] == 200
    assert "Traceback" not in agent.log()


def test_tls_1_2_is_the_least_served(agent: AgentProcess, pki: Pki, tmp_path: Path) -> None:
    context = pki.client()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # what older clients (curl on Buster) speak
    conn = https(agent, context)
    assert get(conn, "/healthz")[0] == 200 and conn.sock.version() == "TLSv1.2"
    conn.close()
    # below 1.2 the client library itself refuses here: the server's floor is read off its context
    cfg = load(None, [f"agent.tls_cert={json.dumps(str(pki.cert))}",
                      f"agent.tls_key={json.dumps(str(pki.key))}"])  # fmt: skip
    assert tls.server_context(cfg).minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_blob_downloads_exactly_over_tls_whole_and_ranged(agent: AgentProcess) -> None:
    weights = os.urandom(SIZE)
    sha = hashlib.sha256(weights).hexdigest()
    upload = agent.upload("b1", len(weights), sha)
    upload.send(weights)
    assert upload.response()[0] == 201
    conn = https(agent, agent.ssl_context)
    try:
        status, headers, body = get(conn, f"/v1/blobs/{sha}", agent.headers())
        assert status == 200 and int(headers["content-length"]) == SIZE
        assert hashlib.sha256(body).hexdigest() == sha
        # on the same kept-alive connection: one range across a slice boundary to the end
        first = (1 << 20) - 5
        ranged = {**agent.headers(), "Range": f"bytes={first}-"}
        status, headers, body = get(conn, f"/v1/blobs/{sha}", ranged)
        assert status == 206 and headers["content-range"] == f"bytes {first}-{SIZE - 1}/{SIZE}"
        assert hashlib.sha256(body).digest() == hashlib.sha256(weights[first:]).digest()
        status, _, body = get(conn, f"/v1/blobs/{sha}", {**agent.headers(), "Range": "bytes=7-9"})
        assert status == 206 and body == weights[7:10]
    finally:
        conn.close()
    assert "Traceback" not in agent.log()


@dataclass(frozen=True)
class Listen:
    """How an agent is asked to listen, and whether it starts."""

    listen: str
    tls: bool
    allow_plain_http: bool | None
    starts: bool


@pytest.mark.parametrize(
    "case",
    [
        Listen("0.0.0.0", tls=False, allow_plain_http=None, starts=False),
        Listen("0.0.0.0", tls=False, allow_plain_http=False, starts=False),
        Listen("", tls=False, allow_plain_http=None, starts=False),
        Listen("0.0.0.0", tls=False, allow_plain_http=True, starts=True),
        Listen("0.0.0.0", tls=True, allow_plain_http=None, starts=True),
        Listen("127.0.0.1", tls=False, allow_plain_http=None, starts=True),
        Listen("localhost", tls=False, allow_plain_http=None, starts=True),
    ],
    ids=[
        "all addresses in plain HTTP is refused",
        "all addresses with allow_plain_http false is refused",
        "an empty listen (all addresses) in plain HTTP is refused",
        "all addresses with allow_plain_http starts",
        "all addresses with TLS starts",
        "loopback in plain HTTP starts",
        "localhost in plain HTTP starts",
    ],
)
def test_plain_http_only_on_loopback_or_when_allowed(tmp_path: Path, pki: Pki, case: Listen):
    agent_cfg: dict[str, object] = {"listen": case.listen}
    if case.allow_plain_http is not None:
        agent_cfg["allow_plain_http"] = case.allow_plain_http
    config = tls_config(pki, **agent_cfg) if case.tls else {**CONFIG, "agent": agent_cfg}
    agent = AgentProcess(tmp_path, config, ssl_context=pki.client() if case.tls else None)
    if case.starts:
        with agent:
            assert agent.request("GET", "/healthz")[0] == 200
        return
    done = subprocess.run(
        [sys.executable, "-m", "pi_agent.cli", "serve", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert "agent.allow_plain_http" in done.stderr and "agent.tls_cert" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_certificate_without_its_key_is_one_line_exit_2(tmp_path: Path, pki: Pki) -> None:
    config = {**CONFIG, "agent": {"tls_cert": pki.cert}}
    agent = AgentProcess(tmp_path, config)
    done = subprocess.run(
        [sys.executable, "-m", "pi_agent.cli", "serve", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "agent.tls_key" in done.stderr


def test_sighup_reloads_the_certificate(tmp_path: Path, pki: Pki) -> None:
    first = make_pki(tmp_path / "first")
    second = make_pki(tmp_path / "second")
    cert, key = tmp_path / "agent.pem", tmp_path / "agent.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    config = {**CONFIG, "agent": {"tls_cert": cert, "tls_key": key}}
    with AgentProcess(tmp_path / "agent", config, ssl_context=first.client()) as agent:
        assert get(https(agent, first.client()), "/healthz")[0] == 200
        shutil.copy(second.cert, cert)
        shutil.copy(second.key, key)
        agent.signal(signal.SIGHUP)
        agent.wait_for(lambda: "configuration reloaded" in agent.log())
        assert get(https(agent, second.client()), "/healthz")[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            get(https(agent, first.client()), "/healthz")
        # a broken key on reload keeps the running certificate
        key.write_text("not a key\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for(lambda: "reload refused" in agent.log())
        assert get(https(agent, second.client()), "/healthz")[0] == 200


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet tests
        pass


@pytest.fixture
def https_files(tmp_path: Path, pki: Pki) -> Iterator[tuple[str, bytes]]:
    """An HTTPS file server with the CA's host certificate, serving one GGUF; its URL and bytes."""
    root = tmp_path / "www"
    root.mkdir()
    weights = os.urandom(200_000)
    (root / "m.gguf").write_bytes(weights)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(root))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/m.gguf", weights
    finally:
        server.shutdown()
        server.server_close()


def test_url_installs_verify_https_against_tls_ca(tmp_path: Path, pki: Pki, https_files) -> None:
    url, weights = https_files
    sha = hashlib.sha256(weights).hexdigest()
    body = {"version": "u1", "url": url, "sha256": sha}
    with AgentProcess(tmp_path / "system-cas", CONFIG) as agent:
        status, answer = agent.json("POST", "/v1/models", body)
        assert status == 422 and "CERTIFICATE_VERIFY_FAILED" in answer["error"]["message"]
        assert agent.json("GET", "/v1/models")[1]["data"] == []
    with AgentProcess(tmp_path / "fleet-ca", {**CONFIG, "agent": {"tls_ca": pki.ca}}) as agent:
        status, answer = agent.json("POST", "/v1/models", body)
        assert status == 201 and answer["sha256"] == sha


def test_the_role_serves_https_unless_its_tls_opt_out_is_set() -> None:
    """roles/pi_agent: allow_plain_http is ``not pi_agent_tls`` (default true: HTTPS only),
    and agent.toml.j2 writes it as a TOML boolean."""
    import jinja2
    from jinja2.nativetypes import NativeEnvironment

    root = Path(__file__).resolve().parents[3]
    role = root / "roles" / "pi_agent"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    assert defaults["pi_agent_tls"] is True
    agent = yaml.safe_load((role / "vars" / "main.yml").read_text())["_pi_agent_settings"]["agent"]
    native = NativeEnvironment()  # as Ansible evaluates a variable that is one expression
    native.filters["bool"] = bool
    plain = {
        tls: native.from_string(agent["allow_plain_http"]).render(pi_agent_tls=tls)
        for tls in (True, False)
    }
    assert plain == {True: False, False: True}

    template = (role / "templates" / "agent.toml.j2").read_text()
    env = jinja2.Environment(trim_blocks=True)  # as Ansible's template module renders
    env.filters["comment"] = lambda text: f"# {text}"
    env.filters["to_json"] = json.dumps
    for allowed in (False, True):
        settings = {"agent": {"listen": "0.0.0.0", "allow_plain_http": allowed}, "store": {}}
        text = env.from_string(template).render(
            ansible_managed="managed", _pi_agent_all_settings=settings
        )
        assert tomllib.loads(text)["agent"]["allow_plain_http"] is allowed


def test_a_tls_client_that_hangs_up_mid_blob_leaks_nothing(agent: AgentProcess) -> None:
    weights = os.urandom(16 * 1024 * 1024)  # more than loopback's buffers hold
    sha = hashlib.sha256(weights).hexdigest()
    upload = agent.upload("big", len(weights), sha)
    upload.send(weights)
    assert upload.response()[0] == 201
    fds = Path(f"/proc/{agent.proc.pid}/fd")

    def open_files() -> list[str]:
        names = []
        for fd in fds.iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                names.append(str(fd.readlink()))
        return names

    model = str(agent.state_dir / "models" / "versions" / "big" / "model.gguf")
    before = len(open_files())
    for _ in range(3):
        conn = https(agent, agent.ssl_context)
        conn.request("GET", f"/v1/blobs/{sha}", headers=agent.headers())
        response = conn.getresponse()
        assert len(response.read(65536)) == 65536
        assert model in open_files()  # mid-transfer: the file is open
        conn.sock.close()
        conn.close()
    agent.wait_for(lambda: model not in open_files() and len(open_files()) <= before)
    assert agent.request("GET", "/healthz")[0] == 200
    assert "Traceback" not in agent.log()
