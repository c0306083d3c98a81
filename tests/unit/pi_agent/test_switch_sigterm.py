"""A model switch stopped by SIGTERM (systemctl restart, a reboot, an Ansible handler) at random
points: after every restart the agent serves a probed model, the old one after a rollback or the
new one only if its probe passed. A real agent process in front of the stand-in llama-server."""

from __future__ import annotations

import collections
import contextlib
import http.client
import random
import threading
import time
from pathlib import Path

import pytest

from pi_agent.testing import AgentProcess, agent_with_stub

ECHO = Path(__file__).with_name("echo_llama_server.py")
WEIGHTS = {
    "old": b"GGUF-old" * 512,
    "good": b"GGUF-good" * 512,
    "bad": b"FAIL-PROBE" + b"x" * 4086,  # loads, then fails every completion: its probe fails
}


def models(agent: AgentProcess) -> tuple[str | None, str | None]:
    """The active and the previous version, as the agent lists them."""
    listing = agent.json("GET", "/v1/models")[1]["data"]
    active = next((m["id"] for m in listing if m["active"]), None)
    return active, next((m["id"] for m in listing if m["previous"]), None)


def settled(agent: AgentProcess) -> bool:
    """No switch pending (an interrupted one is finished) and the decoder ready."""
    marker = agent.state_dir / "models" / "pending-switch.json"
    return not marker.exists() and agent.request("GET", "/readyz")[0] == 200


def served(agent: AgentProcess) -> tuple[int, str]:
    """A completion's status and the weights the decoder serves (links resolved)."""
    status, body = agent.json("POST", "/v1/completions", {"prompt": "Bonjour", "max_tokens": 4})
    return status, body.get("model", "") if status == 200 else ""


def activate(agent: AgentProcess, version: str) -> None:
    """Ask for a switch; the agent may stop before it answers."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        agent.request("POST", f"/v1/models/{version}/activate")


@pytest.mark.slow
def test_sigterm_at_random_points_of_a_switch_leaves_a_probed_model(tmp_path: Path) -> None:
    agent = agent_with_stub(tmp_path, ECHO, WEIGHTS, active="old")
    versions = agent.state_dir / "models" / "versions"
    marker = agent.state_dir / "models" / "pending-switch.json"
    rng = random.Random(13)
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        agent.start()
        agent.wait_for(lambda: settled(agent))
        started = time.monotonic()  # a whole failing switch: restart, probe, roll back, probe
        assert agent.json("POST", "/v1/models/bad/activate")[0] == 409
        duration = time.monotonic() - started
        for point in range(20):
            if models(agent)[0] != "old":
                status, body = agent.json("POST", "/v1/models/old/activate")
                assert status == 200, body
            target = rng.choice(["bad", "good"])
            thread = threading.Thread(target=activate, args=(agent, target), daemon=True)
            delay = rng.uniform(0, duration)
            thread.start()
            time.sleep(delay)  # the SIGTERM point, chosen at random over the switch
            assert agent.stop() == 0
            thread.join(10)
            pending = marker.exists()
            agent.start()
            agent.wait_for(lambda: settled(agent))
            active, previous = models(agent)
            status, model = served(agent)
            where = f"point {point}: SIGTERM {delay:.3f} s into a switch to {target}"
            assert status == 200, where  # the model serving answers (it passed its probe)
            assert model == str(versions / str(active) / "model.gguf"), where
            if target == "bad":
                assert active == "old", where
                assert previous != "bad", (
                    where
                )  # a rollback never leaves the failed one to return to
            else:
                assert active in ("old", "good"), where
            outcomes[f"{target}->{active}{' (interrupted)' if pending else ''}"] += 1
    finally:
        agent.stop()
    interrupted = sum(n for key, n in outcomes.items() if "interrupted" in key)
    assert interrupted >= 5, outcomes  # most SIGTERMs land inside a switch
