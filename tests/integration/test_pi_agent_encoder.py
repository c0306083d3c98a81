"""The encoder's store and switch against the real llama-server: the MiniLM GGUF uploaded to
``/v1/encoder/models``, activated (probed: one embedding of the model's 384 numbers), serving
``/v1/embeddings`` that match sentence-transformers' vectors on the workstation; a corrupt GGUF
whose checksum is right rolled back; a switch left half done by a kill finished at the next start;
GGUFs of the other kind refused by their header."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pi_agent.store import ModelStore
from pi_agent.switch import PENDING, Pending
from pi_agent.testing import AgentProcess

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

SENTENCES = ["The cat sleeps on the warm windowsill.", "Il neige sur Montréal depuis ce matin."]
MINILM_SIZE = 384


def config(llama_tools) -> dict:
    return {
        "llama": {"bin_dir": llama_tools.bin, "restart_backoff_s": 0.2},
        "decoder": {"enabled": False},
        "encoder": {"threads": 1},
        "store": {"free_space_margin_mib": 0, "probe_timeout_s": 30.0},
        "metrics": {"vcgencmd": ""},
    }


def upload(agent: AgentProcess, route: str, version: str, data: bytes) -> tuple[int, dict]:
    sha = hashlib.sha256(data).hexdigest()
    status, _, raw = agent.request(
        "PUT", f"{route}/{version}?sha256={sha}", data,
        headers={"Content-Type": "application/octet-stream"}, timeout=120,
    )  # fmt: skip
    return status, json.loads(raw)


def active(agent: AgentProcess) -> tuple[str | None, str | None]:
    listing = agent.json("GET", "/v1/encoder/models")[1]["data"]
    return (next((m["id"] for m in listing if m["active"]), None),
            next((m["id"] for m in listing if m["previous"]), None))  # fmt: skip


def embed(agent: AgentProcess, sentences: list[str]) -> list[list[float]]:
    status, body = agent.json("POST", "/v1/embeddings", {"input": sentences}, timeout=60)
    assert status == 200, body
    return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]


@pytest.fixture(scope="module")
def agent(tmp_path_factory, llama_tools, pi_agent_encoder_gguf: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("encoder"), config(llama_tools)) as proc:
        status, body = upload(proc, "/v1/encoder/models", "minilm-v1",
                              pi_agent_encoder_gguf.read_bytes())  # fmt: skip
        assert status == 201, body
        status, body = proc.json("POST", "/v1/encoder/models/minilm-v1/activate", timeout=90)
        assert status == 200, body
        yield proc


def test_an_activated_encoder_embeds_as_sentence_transformers_does(
    agent: AgentProcess, encoder_cosines
) -> None:
    vectors = embed(agent, SENTENCES)
    assert [len(v) for v in vectors] == [MINILM_SIZE, MINILM_SIZE]
    cosines = encoder_cosines(SENTENCES, vectors)
    print(f"cosine with transformers mean pooling: {', '.join(f'{c:.6f}' for c in cosines)}")
    assert min(cosines) >= 0.999, cosines
    # and the two sentences are not the same vector (a broken pooling would make them so)
    assert encoder_cosines(SENTENCES[:1], vectors[1:])[0] < 0.9


def test_a_corrupt_encoder_with_a_right_checksum_is_rolled_back(
    agent: AgentProcess, pi_agent_encoder_gguf: Path
) -> None:
    data = pi_agent_encoder_gguf.read_bytes()
    corrupt = data[: len(data) // 2]  # the header parses, the tensors end early
    status, body = upload(agent, "/v1/encoder/models", "minilm-cut", corrupt)
    assert status == 201, body
    status, body = agent.json("POST", "/v1/encoder/models/minilm-cut/activate", timeout=120)
    assert status == 409, body
    assert "model minilm-cut failed its readiness probe" in body["error"]["message"]
    assert "rolled back to minilm-v1" in body["error"]["message"]
    assert active(agent) == ("minilm-v1", None)
    agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200, timeout=60)
    assert len(embed(agent, SENTENCES[:1])[0]) == MINILM_SIZE
    assert agent.json("DELETE", "/v1/encoder/models/minilm-cut")[0] == 200


def test_ggufs_of_the_other_kind_are_refused(
    agent: AgentProcess, pi_agent_encoder_gguf: Path, pi_agent_tiny_gguf: Path
) -> None:
    status, body = upload(agent, "/v1/models", "minilm", pi_agent_encoder_gguf.read_bytes())
    assert status == 422, body
    assert "a bert model, an encoder, not a decoder" in body["error"]["message"]
    status, body = upload(agent, "/v1/encoder/models", "tiny", pi_agent_tiny_gguf.read_bytes())
    assert status == 422, body
    assert "a llama model, a decoder, not an encoder" in body["error"]["message"]


def test_a_switch_to_a_corrupt_encoder_cut_by_a_kill_is_rolled_back_at_start(
    tmp_path: Path, llama_tools, pi_agent_encoder_gguf: Path
) -> None:
    # What a kill -9 leaves between the link's move and the probe: the marker, current on "cut".
    store = ModelStore(tmp_path / "state" / "models" / "encoder")
    store.recover()
    store.install_file("good", pi_agent_encoder_gguf)
    data = pi_agent_encoder_gguf.read_bytes()
    cut = data[: len(data) // 2]
    store.install("cut", [cut], hashlib.sha256(cut).hexdigest())
    store.switch("good")
    Pending("good", "cut", None).write(store.root / PENDING)
    store.switch("cut")
    with AgentProcess(tmp_path, config(llama_tools)) as agent:
        agent.wait_for(lambda: not (store.root / PENDING).exists(), timeout=120)
        assert active(agent) == ("good", None)
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200, timeout=60)
        assert len(embed(agent, SENTENCES[:1])[0]) == MINILM_SIZE
        assert "interrupted switch to cut: it fails its probe" in agent.log()
