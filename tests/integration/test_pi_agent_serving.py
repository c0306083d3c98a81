"""The agent against real llama-servers (the tiny GGUF and MiniLM): the official openai client,
authentication, crash recovery, model switches with probe and rollback, benchmarks, promtool."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


def agent_config(llama_tools, encoder: Path | None) -> dict:
    return {
        "agent": {"log_level": "info"},
        "llama": {"bin_dir": llama_tools.bin, "restart_backoff_s": 0.2, "build": "0c1e570"},
        "decoder": {
            "ctx_size": 512,
            "threads": 1,
            "batch_size": 128,
            "ubatch_size": 128,
            "cache_reuse": 0,
        },
        "encoder": {"enabled": encoder is not None, "model": encoder or "", "threads": 1},
        "store": {"free_space_margin_mib": 0, "probe_timeout_s": 30.0},
        "metrics": {"vcgencmd": ""},
        "bench": {"threads": [1], "n_prompt": 16, "n_gen": 8, "repetitions": 1},
    }


def seed_store(base: Path, gguf: Path) -> None:
    store = ModelStore(base / "state" / "models")
    store.recover()
    store.install_file("tiny-v1", gguf, name="tiny")
    store.switch("tiny-v1")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory, llama_tools, pi_agent_tiny_gguf, pi_agent_encoder_gguf
) -> Iterator[AgentProcess]:
    base = tmp_path_factory.mktemp("serving")
    seed_store(base, pi_agent_tiny_gguf)
    with AgentProcess(base, agent_config(llama_tools, pi_agent_encoder_gguf)) as proc:
        proc.wait_for(lambda: proc.request("GET", "/readyz")[0] == 200, timeout=60)
        yield proc


@pytest.fixture
def client(agent: AgentProcess):
    import openai

    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key=agent.token, max_retries=0, timeout=60)


def test_chat_through_the_openai_client(client) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Salut, ça va?"}], max_tokens=8
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens > 0


def test_streaming_chat_arrives_in_chunks(client) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Raconte"}],
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_text_completion(client) -> None:
    reply = client.completions.create(model="tiny", prompt="Bonjour", max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_embeddings_through_the_encoder(client) -> None:
    reply = client.embeddings.create(model="minilm", input=["bonjour", "salut la gang"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 384
    floats = client.embeddings.create(model="minilm", input="allô", encoding_format="float")
    assert len(floats.data[0].embedding) == 384


def test_openai_client_sees_401_and_403(agent: AgentProcess) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{agent.url}/v1",
            api_key="unused",
            max_retries=0,
            default_headers={"Authorization": "Basic dXNlcjpwYXNz"},
        ).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{agent.url}/v1", api_key="w" * 32, max_retries=0).models.list()


def test_models_list_in_openai_shape(client) -> None:
    ids = [m.id for m in client.models.list().data]
    assert "tiny-v1" in ids


def test_killed_llama_server_is_back_within_5_s(agent: AgentProcess, client) -> None:
    pid = agent.json("GET", "/v1/status")[1]["servers"]["decoder"]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def back() -> bool:
        servers = agent.json("GET", "/v1/status")[1]["servers"]["decoder"]
        return servers["state"] == "ready" and servers["pid"] not in (None, pid)

    agent.wait_for(back, timeout=5, interval=0.05)
    assert time.monotonic() - killed < 5
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    metrics = agent.request("GET", "/metrics")[2].decode()
    assert 'pi_agent_llama_server_restarts_total{role="decoder"} 1' in metrics


def test_metrics_with_llama_server_pass_promtool(agent: AgentProcess) -> None:
    status, _, body = agent.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'pi_agent_llama_server_up{role="decoder"} 1' in text
    assert 'pi_agent_llama_server_up{role="encoder"} 1' in text
    assert 'pi_agent_llamacpp_prompt_tokens_total{role="decoder"}' in text
    assert 'pi_agent_scrape_collector_success{collector="llama_server"} 1' in text
    if not shutil.which("promtool"):
        pytest.skip("promtool (Debian package prometheus) is not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_status_names_the_model_and_llama_cpp(agent: AgentProcess) -> None:
    status = agent.json("GET", "/v1/status")[1]
    assert status["model"]["version"] == "tiny-v1" and len(status["model"]["sha256"]) == 64
    assert status["llama_cpp"]["build"] == "0c1e570" and status["llama_cpp"]["version"]


def _upload(agent: AgentProcess, version: str, data: bytes) -> int:
    sha = hashlib.sha256(data).hexdigest()
    return agent.request(
        "PUT",
        f"/v1/models/{version}?sha256={sha}",
        data,
        headers={"Content-Type": "application/octet-stream"},
    )[0]


def test_switch_probes_and_a_broken_model_is_rolled_back(
    agent: AgentProcess, client, pi_agent_tiny_gguf: Path
) -> None:
    assert _upload(agent, "tiny-v2", pi_agent_tiny_gguf.read_bytes()) == 201
    status, body = agent.json("POST", "/v1/models/tiny-v2/activate", timeout=90)
    assert status == 200 and body["previous"] == "tiny-v1"
    assert _upload(agent, "broken", b"GGUF" + b"\0" * 4096) == 201
    status, body = agent.json("POST", "/v1/models/broken/activate", timeout=90)
    assert status == 409 and "rolled back to tiny-v2" in body["error"]["message"]
    listing = {m.id: m for m in client.models.list().data}
    assert listing["tiny-v2"].active  # type: ignore[attr-defined]
    agent.wait_for(lambda: agent.request("GET", "/readyz")[0] == 200, timeout=30)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_bench_endpoint_returns_and_keeps_the_csv(agent: AgentProcess) -> None:
    status, summary = agent.json(
        "POST",
        "/v1/bench",
        {"threads": [1], "n_prompt": 16, "n_gen": 8, "repetitions": 1},
        timeout=120,
    )
    assert status == 200, summary
    assert {r["test"] for r in summary["results"]} == {"pp16", "tg8"}
    status, _, csv_text = agent.request("GET", "/v1/bench/csv")
    header = csv_text.decode().splitlines()[0].split(",")
    for column in (
        "avg_ts",
        "board",
        "model_sha256",
        "quant",
        "llama_cpp_build",
        "temp_before_c",
        "temp_after_c",
        "throttled_before",
        "throttled_after",
    ):
        assert column in header
    metrics = agent.request("GET", "/metrics")[2].decode()
    assert 'pi_agent_bench_tokens_per_second{test="tg8",threads="1"}' in metrics
    assert agent.json("POST", "/v1/bench", {"threads": [0]})[0] == 400


def test_bench_request_expectation_replaces_the_prediction_both_ways(agent: AgentProcess) -> None:
    # The test host's board is unknown to the reference table: the regressor predicts from the
    # agent's own earlier benchmarks (its history; whether a busy machine keeps up with it is
    # not this test's matter).
    small = {"threads": [1], "n_prompt": 16, "n_gen": 8, "repetitions": 1}
    assert agent.json("POST", "/v1/bench", small, timeout=120)[0] == 200  # history at least once
    status, plain = agent.json("POST", "/v1/bench", small, timeout=120)
    assert status == 200 and plain["gate"]["checked"] == 2, plain
    assert [r["predicted_by"] for r in plain["results"]] == ["regressor", "regressor"]
    status, slow = agent.json(
        "POST", "/v1/bench", {**small, "expected": {"tg": 1e6}, "tolerance": 0.5}, timeout=120
    )
    assert status == 200, slow
    assert slow["gate"]["passed"] is False and slow["gate"]["tolerance"] == 0.5
    assert [r["predicted_by"] for r in slow["results"]] == ["regressor", "expected"]
    failures = slow["gate"]["failures"]
    tg = [f for f in failures if f.startswith("tg8 with 1 threads")]
    assert len(tg) == 1 and "(50% of the expected 1000000.00)" in tg[0], failures
    # pp16 is still judged against the regressor's prediction: a busy machine may fail it too
    # (11,347 tok/s against a predicted 48,104 once in make test), never against an expectation.
    assert all(f.startswith("pp16 with 1 threads") and "of the predicted" in f
               for f in failures if f not in tg), failures  # fmt: skip
    status, fine = agent.json(
        "POST", "/v1/bench", {**small, "expected": {"pp": 0.01, "tg": 0.01}}, timeout=120
    )
    assert status == 200 and fine["gate"] == {**fine["gate"], "passed": True, "checked": 2}
    for bad in ({"expected": {"tg": 0}}, {"expected": {"xx": 1}}, {"tolerance": 1.5}):
        status, error = agent.json("POST", "/v1/bench", {**small, **bad})
        assert status == 400, (bad, error)


def test_sigterm_stops_the_children(tmp_path: Path, llama_tools, pi_agent_tiny_gguf) -> None:
    seed_store(tmp_path, pi_agent_tiny_gguf)
    with AgentProcess(tmp_path, agent_config(llama_tools, None)) as proc:
        proc.wait_for(lambda: proc.request("GET", "/readyz")[0] == 200, timeout=60)
        child = proc.json("GET", "/v1/status")[1]["servers"]["decoder"]["pid"]
        assert proc.stop() == 0
    assert (
        not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    )


def _bench_cli(tmp_path: Path, llama_tools, gguf: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pi_agent.cli",
            "bench",
            "--state-dir",
            str(tmp_path / "state"),
            "--set",
            f"llama.bin_dir={json.dumps(str(llama_tools.bin))}",
            "--model",
            str(gguf),
            "--threads",
            "1",
            "--n-prompt",
            "16",
            "--n-gen",
            "8",
            "--repetitions",
            "1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_cli_gate_passes_and_fails(tmp_path: Path, llama_tools, pi_agent_tiny_gguf) -> None:
    # The Pi 4 rows extrapolated to the tiny model on this x86 machine: a 75% floor failed under
    # a busy test run (3,614 against 4,377 tok/s). A floor of 1% of it still judges both tests.
    done = _bench_cli(tmp_path, llama_tools, pi_agent_tiny_gguf, "--board", "pi4",
                      "--tolerance", "0.99")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["gate"]["checked"] == 2 and summary["metadata"]["board"] == "pi4"
    # A fleet history claiming this board does 1000x better makes the same run fail the gate.
    history = tmp_path / "history"
    history.mkdir()
    text = Path(summary["csv"]).read_text().splitlines()
    header = text[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in text[1:]]
    import csv

    with (history / "fleet.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        for _ in range(20):
            for row in rows:
                writer.writerow({**row, "avg_ts": float(row["avg_ts"]) * 1000})
    failed = _bench_cli(
        tmp_path, llama_tools, pi_agent_tiny_gguf, "--board", "pi4", "--history", str(history)
    )
    assert failed.returncode == 1, failed.stdout
    assert "gate failed" in failed.stderr
    # The operator's own expectation overrides that history, both ways.
    expect = ("--board", "pi4", "--history", str(history))
    passed = _bench_cli(tmp_path, llama_tools, pi_agent_tiny_gguf, *expect, "--expect", "tg=0.5")
    assert passed.returncode == 1  # pp still judged against the history, tg now passes
    judged = json.loads(passed.stdout)["results"]
    by = {r["test"][:2]: r["predicted_by"] for r in judged}
    assert by == {"pp": "regressor", "tg": "expected"}
    both = _bench_cli(
        tmp_path, llama_tools, pi_agent_tiny_gguf, *expect, "--expect", "tg=0.5,pp=0.5"
    )
    assert both.returncode == 0, both.stderr
    bad = _bench_cli(tmp_path, llama_tools, pi_agent_tiny_gguf, "--expect", "tg=fast")
    assert bad.returncode == 2 and "'tg=fast'" in bad.stderr


# Structured output: the real llama-server holds the random tiny model to a schema or a grammar.

# The name's characters are bounded too: a free string lets the random model pick byte tokens
# that make no UTF-8 (0xFE), and llama-server's chat parser then fails on its own constrained
# output (a 500, about one chat in four with {"type": "string", "maxLength": 12}).
PERSON = {
    "type": "object",
    "properties": {
        "nom": {"type": "string", "pattern": "^[A-Za-zéèÉ' -]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "saison": {"enum": ["hiver", "printemps", "été", "automne"]},
    },
    "required": ["nom", "age", "saison"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Décris une personne en JSON: nom, âge pis saison préférée."}]
SAMPLES = 20


def schema_valid(text: str | None, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text or ""), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_a_json_schema_response_format_gives_valid_json(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "personne", "schema": PERSON}}
    held, free = [], []
    for seed in range(SAMPLES):
        common = {"model": "tiny", "messages": ASK, "max_tokens": 128, "seed": seed,
                  "temperature": 1.0}  # fmt: skip
        held.append(client.chat.completions.create(**common, response_format=fmt))
        free.append(client.chat.completions.create(**common))
    valid_held = sum(schema_valid(r.choices[0].message.content, PERSON) for r in held)
    valid_free = sum(schema_valid(r.choices[0].message.content, PERSON) for r in free)
    print(f"schema-valid answers of the random tiny model: {valid_held}/{SAMPLES} with "
          f"response_format, {valid_free}/{SAMPLES} without")  # fmt: skip
    assert valid_held == SAMPLES, [r.choices[0].message.content for r in held]
    assert valid_free <= SAMPLES // 2  # the constraint, not the model, makes the JSON


def test_a_streamed_answer_follows_the_schema_too(agent: AgentProcess) -> None:
    body = {"messages": ASK, "max_tokens": 128, "seed": 3, "stream": True,
            "response_format": {"type": "json_object", "schema": PERSON}}  # fmt: skip
    status, headers, raw = agent.request("POST", "/v1/chat/completions", body, timeout=60)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert schema_valid(text, PERSON), text


def test_a_text_completion_takes_response_format_too(agent: AgentProcess) -> None:
    # llama-server reads response_format on chat only: the agent hands it json_schema instead.
    fmt = {"type": "json_schema", "json_schema": {"name": "personne", "schema": PERSON}}
    for seed in range(5):
        status, body = agent.json("POST", "/v1/completions", {
            "prompt": "Une personne: ", "response_format": fmt, "max_tokens": 128, "seed": seed,
        })  # fmt: skip
        assert status == 200, body
        assert schema_valid(body["choices"][0]["text"], PERSON), body["choices"][0]["text"]


def test_a_grammar_holds_a_text_completion(agent: AgentProcess) -> None:
    answers = set()
    for seed in range(6):
        status, body = agent.json("POST", "/v1/completions", {
            "prompt": "Fait-il froid? ", "grammar": 'root ::= "oui" | "non" | "pantoute"',
            "max_tokens": 8, "seed": seed, "temperature": 1.0,
        })  # fmt: skip
        assert status == 200, body
        answers.add(body["choices"][0]["text"])
    assert answers <= {"oui", "non", "pantoute"} and answers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_what_llama_server_cannot_take_is_a_400_in_its_words(
    agent: AgentProcess, path: str
) -> None:
    base = {"messages": ASK} if path.endswith("chat/completions") else {"prompt": "Allô"}
    # Valid JSON Schema (jsonschema does not resolve references), no grammar for llama-server.
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/absent"}}}
    cases = [
        ({"response_format": {"type": "json_object", "schema": dangling}}, "cannot resolve $ref"),
        ({"grammar": "root ::= ("}, "grammar"),
    ]
    for given, words in cases:
        status, answer = agent.json("POST", path, {**base, **given, "max_tokens": 4})
        assert status == 400, answer
        assert words in answer["error"]["message"], answer
    assert agent.request("GET", "/readyz")[0] == 200
