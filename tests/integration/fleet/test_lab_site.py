"""site.yml on the lab: provision, deploy and bench, a second run that changes nothing, an
OpenAI client answered by the deployed student, and agents that speak HTTPS only to clients
that trust the fleet's CA (made on the workstation by the pi_agent role).

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and
share one lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary).
"""

from __future__ import annotations

import http.client
import ssl
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fleet_helpers import foreign_ca, recap, run, version_of
from lab_helpers import (
    FLEET_CA,
    HOSTS,
    active_version,
    agent_get,
    fleet_tls,
    lab_hosts,
    on_board,
    site,
    token,
)

pytestmark = pytest.mark.slow


def test_site_serves_and_benchmarks_the_lab_and_a_second_run_changes_nothing(
    lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from distill import llamacpp

    llamacpp.require_tools()  # seeds the stand-ins' class
    results = tmp_path_factory.mktemp("results")
    cmd = site(lab, student_export, results)
    started = time.monotonic()
    first = recap(run(cmd, timeout=1200).stdout)
    first_s = time.monotonic() - started
    assert set(first) == set(HOSTS)
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in first.values()), first
    assert all(c["changed"] > 0 for c in first.values())
    version = version_of(student_export)
    installed = {h: agent_get(lab, h, f"/v1/models/{version}")["created"] for h in HOSTS}
    assert {h: active_version(lab, h) for h in HOSTS} == dict.fromkeys(HOSTS, version)
    for host in HOSTS:
        assert len(list((results / host).glob("*.csv"))) == 1
    report = (results / "fleet-report.csv").read_text().splitlines()
    assert report[0].startswith("host,board,model,quant,threads,pp_tok_s,tg_tok_s")
    assert sorted(line.split(",")[0] for line in report[1:]) == HOSTS
    assert (results / "fleet-report.md").is_file() and (results / "fleet-report.png").is_file()

    # The fleet's CA and a certificate per host, made on the workstation; the keys stay 0600.
    pki = {path.name: path.read_bytes() for path in sorted(FLEET_CA.rglob("*.*"))}
    made = {"ca.pem", "ca.key"} | {f"{host}.{ext}" for host in HOSTS for ext in ("pem", "key")}
    assert made <= set(pki)
    assert {oct(p.stat().st_mode & 0o777) for p in FLEET_CA.rglob("*.key")} == {"0o600"}
    assert oct(FLEET_CA.stat().st_mode & 0o777) == "0o700"

    second = recap(run(cmd, timeout=1200).stdout)
    assert {host: counts["changed"] for host, counts in second.items()} == dict.fromkeys(HOSTS, 0)
    # Nothing moved: the same version, installed at the same moment, on every board.
    assert {h: agent_get(lab, h, f"/v1/models/{version}")["created"] for h in HOSTS} == installed
    # Neither the CA nor any host's key or certificate was made again.
    assert {path.name: path.read_bytes() for path in sorted(FLEET_CA.rglob("*.*"))} == pki
    print(f"site.yml first run {first_s:.0f} s")


def test_an_openai_client_gets_text_from_the_deployed_student(
    lab: Path, student_export: Path
) -> None:
    import httpx
    import openai

    url = lab_hosts(lab)["pi-2"]["pi_agent_url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token("pi-2"), timeout=60,
                           http_client=httpx.Client(verify=fleet_tls()))  # fmt: skip
    assert version_of(student_export) in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(
        model=version_of(student_export),
        messages=[{"role": "user", "content": "Bonjour! Comment ça va?"}],
        max_tokens=8,
    )
    assert answer.choices[0].message.content.strip()


def tls_peer(address: str, context: ssl.SSLContext) -> dict:
    """The certificate an agent presents, once ``context`` verified it (else an ``SSLError``)."""
    import socket

    with (
        socket.create_connection((address, 8470), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=address) as conn,
    ):
        return conn.getpeercert()


def test_the_agents_speak_https_only_to_clients_that_trust_the_fleet_ca(
    lab: Path, tmp_path: Path
) -> None:
    other = ssl.create_default_context(cafile=foreign_ca(tmp_path))
    for host, hostvars in lab_hosts(lab).items():
        address = hostvars["ansible_host"]
        # Trusted: the certificate names the host as the inventory and the clients know it.
        names = {value for _, value in tls_peer(address, fleet_tls())["subjectAltName"]}
        assert {host, address, "127.0.0.1", "localhost"} <= names, names
        # Refused: the system's CAs, and another fleet's CA.
        for context in (ssl.create_default_context(), other):
            with pytest.raises(ssl.SSLCertVerificationError):
                tls_peer(address, context)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(hostvars["pi_agent_url"] + "/healthz", timeout=30)
        # Plain HTTP to the agent gets no answer (the token would cross the network in clear).
        plain = hostvars["pi_agent_url"].replace("https://", "http://") + "/healthz"
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(plain, timeout=30)
        # What the role wrote: HTTPS, no plain-HTTP switch, the allowlist.
        config = tomllib.loads(on_board(lab, host, "cat /etc/pi-agent/agent.toml"))
        assert config["agent"]["tls_cert"] == "/etc/pi-agent/tls.pem"
        assert config["agent"]["tls_ca"] == "/etc/pi-agent/fleet-ca.pem"
        assert config["agent"]["allow_plain_http"] is False
        assert config["store"]["allowlist_file"] == "/etc/pi-agent/allowlist"
        modes = on_board(lab, host, "stat -c '%n %a %U %G' /etc/pi-agent/tls.key")
        assert modes.split() == ["/etc/pi-agent/tls.key", "640", "root", "pi-agent"]
