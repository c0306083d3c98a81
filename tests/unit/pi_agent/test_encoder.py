"""The encoder's store and switch (``/v1/encoder/models...``) through a real agent in front of the
stand-in llama-server: install, activate, probe by the vector's size, roll back, finish a switch
interrupted by a stop, refuse a GGUF of the other kind and a sha256 off the allowlist."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from pi_agent.gguf import Header, read_header
from pi_agent.store import ModelStore
from pi_agent.switch import PENDING, Pending
from pi_agent.testing import AgentProcess, agent_with_stub

ECHO = Path(__file__).with_name("echo_llama_server.py")
DECODER = b"GGUF-good-" * 400  # the stand-in serves anything that does not ask it to fail
STUB_SIZE = 8  # the stand-in's vectors (echo_llama_server.EMBEDDING_SIZE)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf(architecture: str, embedding_length: int, tokens: int = 3) -> bytes:
    """A GGUF v3 header as llama.cpp's converter orders it: the architecture, a tokenizer array,
    the embedding size (then no tensors: the stand-in does not read them)."""
    kv = _string("general.architecture") + struct.pack("<I", 8) + _string(architecture)
    kv += _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, tokens)
    kv += b"".join(_string(f"tok{i}") for i in range(tokens))
    kv += _string(f"{architecture}.embedding_length") + struct.pack("<II", 4, embedding_length)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + kv + b"\0" * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(agent: AgentProcess, route: str, version: str, data: bytes) -> tuple[int, dict]:
    status, _, raw = agent.request(
        "PUT",
        f"{route}/{version}?sha256={sha(data)}",
        data,
        headers={"Content-Type": "application/octet-stream"},
    )
    return status, json.loads(raw)


def links(agent: AgentProcess) -> tuple[str | None, str | None]:
    """The encoder's active and previous versions, as the agent lists them."""
    listing = agent.json("GET", "/v1/encoder/models")[1]["data"]
    active = next((m["id"] for m in listing if m["active"]), None)
    return active, next((m["id"] for m in listing if m["previous"]), None)


def embedded_by(agent: AgentProcess) -> str:
    """The weights the encoder serves (the stand-in names them)."""
    status, body = agent.json("POST", "/v1/embeddings", {"input": ["allô", "salut"]})
    assert status == 200, body
    assert [len(d["embedding"]) for d in body["data"]] == [STUB_SIZE, STUB_SIZE]
    return body["model"]


def encoder_versions(agent: AgentProcess) -> Path:
    return agent.state_dir / "models" / "encoder" / "versions"


def test_the_header_reader_skips_arrays_and_tells_nothing_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "bert.gguf").write_bytes(gguf("bert", 384, tokens=1000))
    (tmp_path / "llama.gguf").write_bytes(gguf("llama", 96))
    (tmp_path / "cut.gguf").write_bytes(gguf("bert", 384, tokens=1000)[:200])
    (tmp_path / "text.gguf").write_bytes(b"not a gguf at all")
    assert read_header(tmp_path / "bert.gguf") == Header("bert", 384)
    assert read_header(tmp_path / "bert.gguf").kind == "encoder"
    assert read_header(tmp_path / "llama.gguf").kind == "decoder"
    assert read_header(tmp_path / "cut.gguf") == Header()
    assert read_header(tmp_path / "text.gguf").kind is None
    assert read_header(tmp_path / "missing.gguf") == Header()


def test_an_encoder_is_installed_activated_and_served(tmp_path: Path) -> None:
    with agent_with_stub(tmp_path, ECHO, {"d1": DECODER}, active="d1") as agent:
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200)
        status, body = agent.json("POST", "/v1/embeddings", {"input": "allô"})
        assert status == 404 and "no encoder" in body["error"]["message"], body
        status, manifest = upload(agent, "/v1/encoder/models", "e1", gguf("bert", STUB_SIZE))
        assert status == 201, manifest
        assert [m["id"] for m in agent.json("GET", "/v1/models")[1]["data"]] == ["d1"]
        assert links(agent) == (None, None)
        status, body = agent.json("POST", "/v1/encoder/models/e1/activate")
        assert status == 200 and body["active"] == "e1", body
        assert embedded_by(agent) == str(encoder_versions(agent) / "e1" / "model.gguf")
        status, ready = agent.json("GET", "/readyz")
        assert status == 200 and ready["servers"] == {"decoder": "ready", "encoder": "ready"}
        status = agent.json("GET", "/v1/status")[1]
        assert status["encoder_model"]["version"] == "e1"
        assert status["model"]["version"] == "d1"


def test_a_gguf_of_the_other_kind_is_refused_with_its_reason(tmp_path: Path) -> None:
    with agent_with_stub(tmp_path, ECHO, {}) as agent:
        status, body = upload(agent, "/v1/models", "minilm", gguf("bert", 384))
        assert status == 422, body
        assert body["error"]["message"] == (
            "this GGUF is a bert model, an encoder, not a decoder: "
            "install it with /v1/encoder/models"
        )
        status, body = upload(agent, "/v1/encoder/models", "tiny", gguf("llama", 96))
        assert status == 422, body
        assert body["error"]["message"] == (
            "this GGUF is a llama model, a decoder, not an encoder: install it with /v1/models"
        )
        assert agent.json("GET", "/v1/models")[1]["data"] == []
        assert agent.json("GET", "/v1/encoder/models")[1]["data"] == []
        assert not list((agent.state_dir / "models" / "versions").iterdir())
        assert not list(encoder_versions(agent).iterdir())


def test_an_encoder_whose_vectors_are_not_its_size_is_rolled_back(tmp_path: Path) -> None:
    with agent_with_stub(tmp_path, ECHO, {"d1": DECODER}, active="d1") as agent:
        assert upload(agent, "/v1/encoder/models", "e1", gguf("bert", STUB_SIZE))[0] == 201
        assert upload(agent, "/v1/encoder/models", "e2", gguf("bert", STUB_SIZE + 1))[0] == 201
        assert agent.json("POST", "/v1/encoder/models/e1/activate")[0] == 200
        status, body = agent.json("POST", "/v1/encoder/models/e2/activate")
        assert status == 409, body
        message = body["error"]["message"]
        assert f"vector of {STUB_SIZE} numbers, not the model's {STUB_SIZE + 1}" in message
        assert "rolled back to e1" in message
        assert links(agent) == ("e1", None)
        assert embedded_by(agent) == str(encoder_versions(agent) / "e1" / "model.gguf")
        # the decoder's store was left alone
        assert agent.json("GET", "/v1/status")[1]["model"]["version"] == "d1"


def test_a_first_encoder_that_fails_leaves_the_pi_ready_without_one(tmp_path: Path) -> None:
    with agent_with_stub(tmp_path, ECHO, {"d1": DECODER}, active="d1") as agent:
        assert upload(agent, "/v1/encoder/models", "e1", b"FAIL-START" * 400)[0] == 201
        status, body = agent.json("POST", "/v1/encoder/models/e1/activate")
        assert status == 409, body
        assert "no model is active" in body["error"]["message"]
        assert links(agent) == (None, None)
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200)
        assert agent.json("GET", "/readyz")[1]["servers"] == {"decoder": "ready"}
        assert agent.json("POST", "/v1/embeddings", {"input": "x"})[0] == 404


def test_an_encoder_switch_interrupted_by_a_stop_is_rolled_back_at_start(tmp_path: Path) -> None:
    # What a kill leaves after the link moved to e2 and before its probe: the marker and the link.
    store = ModelStore(tmp_path / "state" / "models" / "encoder")
    store.recover()
    for version, data in (("e1", gguf("bert", STUB_SIZE)), ("e2", gguf("bert", 3))):
        store.install(version, [data], sha(data))
    store.switch("e1")
    Pending("e1", "e2", None).write(store.root / PENDING)
    store.switch("e2")
    with agent_with_stub(tmp_path, ECHO, {"d1": DECODER}, active="d1") as agent:
        agent.wait_for(lambda: not (store.root / PENDING).exists())
        assert links(agent) == ("e1", None)
        agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200)
        assert embedded_by(agent) == str(encoder_versions(agent) / "e1" / "model.gguf")
        assert "interrupted switch to e2: it fails its probe" in agent.log()


def test_an_encoder_off_the_allowlist_is_refused(tmp_path: Path) -> None:
    allowed, other = gguf("bert", STUB_SIZE), gguf("bert", STUB_SIZE, tokens=4)
    allowlist = tmp_path / "allowlist"
    allowlist.write_text(f"{sha(allowed)}  # the fleet's encoder\n")
    config = {"store": {"allowlist_file": str(allowlist)}}
    with agent_with_stub(tmp_path, ECHO, {}, config=config) as agent:
        status, body = upload(agent, "/v1/encoder/models", "other", other)
        assert status == 403 and "not in the allowlist" in body["error"]["message"], body
        assert upload(agent, "/v1/encoder/models", "e1", allowed)[0] == 201
        allowlist.write_text("")  # taken off the list after the install: no activation either
        status, body = agent.json("POST", "/v1/encoder/models/e1/activate")
        assert status == 403, body
        assert links(agent) == (None, None)


def test_encoder_routes_are_published() -> None:
    from pi_agent.openapi import document

    paths = document()["paths"]
    for tail in ("", "/{version}", "/{version}/activate", "/rollback"):
        assert f"/v1/encoder/models{tail}" in paths
    assert "embedding" in paths["/v1/encoder/models/{version}/activate"]["post"]["description"]
