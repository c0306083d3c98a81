"""The agent client against real HTTP servers on 127.0.0.1: a stand-in and the real pi-agent,
over plain HTTP and over HTTPS with a throwaway fleet CA (``pki`` in conftest.py)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tui.agent import AgentClient, AgentError, Tokens, parse_status
from tui.testing import FakeAgent, sample_bench, sample_status


def test_fetch_reads_status_readiness_and_last_benchmark() -> None:
    status = sample_status("pi-a", temperature=61.5, throttled=0x50004)
    with FakeAgent(status, token="t", bench=sample_bench(tg=21.5)) as agent:
        got = AgentClient(agent.url, "t").fetch()
    assert got.host == "pi-a" and got.board == "pi5"
    assert (got.model_name, got.model_version) == ("quebecois-135m", "v3")
    assert got.llama_build == "0c1e570"
    assert got.temperature_c == 61.5
    assert got.throttled_now == ("throttled",)
    assert got.throttled_since_boot == ("throttled", "under_voltage")  # 0x50000
    assert got.throttling == "throttled"
    assert got.zram == "lz4 1.0G 3.0x"
    assert got.ready is True and got.tg_tok_s == 21.5
    assert ("/v1/status", "Bearer t") in agent.requests


def test_not_ready_and_no_benchmark_yet() -> None:
    with FakeAgent(token="t", ready=False) as agent:
        got = AgentClient(agent.url, "t").fetch()
    assert got.ready is False and got.tg_tok_s is None


@pytest.mark.parametrize(
    ("token", "message"),
    [("wrong", "token refused (403: invalid bearer token)"), (None, "no token")],
    ids=["a wrong token is refused", "a missing token says how to give one"],
)
def test_token_errors_are_one_line(token: str | None, message: str) -> None:
    with (
        FakeAgent(token="right") as agent,
        pytest.raises(AgentError, match=re.escape(message)),
    ):
        AgentClient(agent.url, token).fetch()


def test_an_unreachable_agent_is_an_agent_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentError, match="unreachable"):
        AgentClient(f"http://127.0.0.1:{port}", "t", timeout=2).fetch()


def test_an_answer_that_is_not_json_is_an_agent_error() -> None:
    broken = FakeAgent(token="t", raw_status=b"<html>proxy error</html>")
    with broken as agent, pytest.raises(AgentError, match="not JSON"):
        AgentClient(agent.url, "t").fetch()


def test_missing_or_odd_fields_read_as_none() -> None:
    got = parse_status({"host": 3, "model": "oops", "temperature_c": "hot", "zram": []})
    assert got.host is None and got.model_name is None and got.temperature_c is None
    assert got.zram == "off" and got.throttling == "?"
    with pytest.raises(AgentError):
        parse_status(["not", "an", "object"])


def test_healthz_needs_no_token() -> None:
    with FakeAgent(token="t") as agent:
        assert AgentClient(agent.url).healthy()


def test_tokens_per_host_file_wins_over_the_fleet_file(tmp_path: Path) -> None:
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "pi-a").write_text("aaa\n")
    (tmp_path / "fleet-token").write_text("fleet\n")
    tokens = Tokens(token_file=tmp_path / "fleet-token", token_dir=tmp_path / "tokens")
    assert tokens.for_host("pi-a") == "aaa"
    assert tokens.for_host("pi-b") == "fleet"
    assert Tokens().for_host("pi-a") is None
    with pytest.raises(AgentError, match="token file"):
        Tokens(token_file=tmp_path / "missing").for_host("pi-a")


def test_against_the_real_pi_agent(tmp_path: Path) -> None:
    """The field names the client reads are the ones ``pi-agent serve`` sends."""
    from pi_agent.testing import AgentProcess

    with AgentProcess(tmp_path, {"decoder": {"enabled": False}}) as agent:
        got = AgentClient(agent.url, agent.token).fetch()
        with pytest.raises(AgentError, match="403"):
            AgentClient(agent.url, "not-the-token").fetch()
    assert got.host and got.board  # the VM's hostname; "unknown" board off a Pi
    assert got.ready is False  # no llama-server enabled
    assert set(got.raw) >= {"host", "board", "temperature_c", "throttled", "zram", "model"}


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator:
    """The real pi-agent serving HTTPS with a certificate of the throwaway fleet CA."""
    import ssl

    from pi_agent.testing import AgentProcess

    config = {
        "decoder": {"enabled": False},
        "agent": {"tls_cert": pki["cert"], "tls_key": pki["key"]},
    }
    context = ssl.create_default_context(cafile=pki["ca"])
    with AgentProcess(tmp_path_factory.mktemp("tls-agent"), config, ssl_context=context) as agent:
        yield agent


def test_an_https_agent_is_read_through_the_fleet_ca(tls_agent, pki: dict[str, Path]) -> None:
    assert tls_agent.url.startswith("https://127.0.0.1:")
    got = AgentClient(tls_agent.url, tls_agent.token, ca_file=pki["ca"]).fetch()
    assert got.host and got.ready is False
    assert AgentClient(tls_agent.url, ca_file=pki["ca"]).healthy()


@pytest.mark.parametrize(
    "trust",
    ["system", "other_ca"],
    ids=["the system's CAs alone do not trust the agent", "a foreign CA does not either"],
)
def test_an_agent_whose_certificate_does_not_verify_is_refused(
    tls_agent, pki: dict[str, Path], trust: str
) -> None:
    ca_file = None if trust == "system" else pki[trust]
    client = AgentClient(tls_agent.url, tls_agent.token, ca_file=ca_file)
    with pytest.raises(AgentError, match="certificate not trusted") as err:
        client.fetch()
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    with pytest.raises(AgentError, match="certificate not trusted"):
        client.healthy()


def test_an_address_the_certificate_does_not_cover_is_refused(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The certificate names 127.0.0.1 and localhost: an agent of the same CA answering at
    127.0.0.2 is not the one it names."""
    from pi_agent.testing import AgentProcess

    config = {
        "decoder": {"enabled": False},
        "agent": {"listen": "127.0.0.2", "tls_cert": pki["cert"], "tls_key": pki["key"]},
    }
    with AgentProcess(tmp_path, config) as agent:
        url = f"https://127.0.0.2:{agent.port}"
        with pytest.raises(AgentError, match="certificate not trusted") as err:
            AgentClient(url, agent.token, ca_file=pki["ca"]).fetch()
    assert "127.0.0.2" in str(err.value)


def test_a_ca_file_that_does_not_read_is_one_line(tls_agent, tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"CA file .*missing\.pem"):
        AgentClient(tls_agent.url, tls_agent.token, ca_file=tmp_path / "missing.pem").fetch()


def test_plain_http_to_the_https_agent_gets_no_status(tls_agent) -> None:
    url = tls_agent.url.replace("https://", "http://")
    with pytest.raises(AgentError):
        AgentClient(url, tls_agent.token, timeout=5).fetch()
