"""Rollback when a new model fails its probe, through a real agent in front of the stand-in
llama-server: the old model failing too is a 503 that says so, a first model that fails is not
left active, and after a rollback ``previous`` is never the failed version."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pi_agent.testing import AgentProcess, agent_with_stub

ECHO = Path(__file__).with_name("echo_llama_server.py")
GOOD = b"GGUF-good-" * 400
BAD = b"FAIL-PROBE" * 400  # the stand-in loads it, then fails every completion
UNLOADABLE = b"FAIL-START" * 400  # the stand-in exits at once, as llama-server on a broken GGUF


def links(agent: AgentProcess) -> tuple[str | None, str | None]:
    """The active and the previous version, as the agent lists them."""
    listing = agent.json("GET", "/v1/models")[1]["data"]
    active = next((m["id"] for m in listing if m["active"]), None)
    return active, next((m["id"] for m in listing if m["previous"]), None)


def served(agent: AgentProcess) -> str:
    """The weights the decoder serves."""
    status, body = agent.json("POST", "/v1/completions", {"prompt": "Bonjour", "max_tokens": 4})
    assert status == 200, body
    return body["model"]


def test_an_old_model_that_fails_its_probe_too_is_a_503(tmp_path: Path) -> None:
    weights = {"v1": GOOD, "bad": BAD}
    with agent_with_stub(tmp_path, ECHO, weights, active="v1") as agent:
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200)
        # v1's weights go bad on the card after it was activated (a rollback does not rehash)
        model = agent.state_dir / "models" / "versions" / "v1" / "model.gguf"
        model.write_bytes(BAD[: len(GOOD)])
        status, body = agent.json("POST", "/v1/models/bad/activate")
        assert status == 503, body
        message = body["error"]["message"]
        assert "model bad failed its readiness probe" in message
        assert "rolled back to v1, which fails its probe too" in message
        assert links(agent)[0] == "v1"


def test_a_first_model_that_fails_its_probe_is_not_left_active(tmp_path: Path) -> None:
    with agent_with_stub(tmp_path, ECHO, {"first": UNLOADABLE}) as agent:
        status, body = agent.json("POST", "/v1/models/first/activate")
        assert status == 409, body
        assert "model first failed its readiness probe" in body["error"]["message"]
        assert "no model is active" in body["error"]["message"]
        assert links(agent) == (None, None)
        assert not (agent.state_dir / "models" / "current").is_symlink()
        status, body = agent.json("GET", "/readyz")
        assert status == 503 and body["servers"] == {"decoder": "stopped"}
        status, body = agent.json("POST", "/v1/completions", {"prompt": "x"})
        assert status == 503, body


def test_after_a_rollback_previous_is_not_the_failed_version(tmp_path: Path) -> None:
    weights = {"v0": GOOD, "v1": GOOD + b"1", "bad": BAD}
    with agent_with_stub(tmp_path, ECHO, weights, active="v0") as agent:
        versions = agent.state_dir / "models" / "versions"
        assert agent.json("POST", "/v1/models/v1/activate")[0] == 200
        assert links(agent) == ("v1", "v0")
        status, body = agent.json("POST", "/v1/models/bad/activate")
        assert status == 409 and "rolled back to v1" in body["error"]["message"], body
        assert links(agent) == ("v1", "v0")  # as before the failed switch
        assert served(agent) == str(versions / "v1" / "model.gguf")
        assert agent.json("DELETE", "/v1/models/v0")[0] == 409  # still protected from pruning
        assert agent.json("DELETE", "/v1/models/bad")[0] == 200  # the failed one is not
        status, body = agent.json("POST", "/v1/models/rollback")
        assert status == 200 and body["active"] == "v0", body
        assert served(agent) == str(versions / "v0" / "model.gguf")


def test_a_hung_server_is_not_ready_and_a_rollback_stops_it_with_sigterm(tmp_path: Path) -> None:
    # What model_sync's readiness check meets when a new version hangs after its probe passed
    # (the lab test causes it with SIGSTOP on a real llama-server): /readyz is 503, and the
    # rollback that follows stops the stopped server with SIGTERM (SIGCONT lets it take it),
    # not after 10 s with SIGKILL.
    weights = {"v0": GOOD, "v1": GOOD + b"1"}
    with agent_with_stub(tmp_path, ECHO, weights, active="v0") as agent:
        assert agent.json("POST", "/v1/models/v1/activate")[0] == 200
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200)
        pid = agent.json("GET", "/v1/status")[1]["servers"]["decoder"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 503, timeout=10)
        status, body = agent.json("POST", "/v1/models/rollback")
        assert status == 200 and body["active"] == "v0", body
        assert served(agent) == str(agent.state_dir / "models" / "versions" / "v0" / "model.gguf")
        assert "ignored SIGTERM" not in agent.log()
