"""``distill chat``: a bad flag is one line naming it (exit 2); the request the agent gets; the
token and the CA found where the pi_agent role puts them; an answer streamed from a stand-in
agent. The real agent and llama-server are in ``tests/integration/test_chat_agent.py``."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from distill import cli
from distill.agent_client import AgentConnection, AgentError, fleet_ca
from distill.chat import MAX_MESSAGES, ChatArgs, chat_body, run, token_for
from tui.testing import FakeAgent

AGENT = "https://127.0.0.1:8470"


@dataclass(frozen=True)
class BadFlag:
    argv: tuple[str, ...]
    message: str


BAD_FLAGS = {
    "no agent": BadFlag((), "missing required option(s): --agent"),
    "an agent that is not a URL": BadFlag(
        ("--agent", "pi-1:8470"), "--agent: expected http(s)://HOST:PORT, got 'pi-1:8470'"
    ),
    "no tokens to generate": BadFlag(("--max-tokens", "0"), "--max-tokens: must be 1-1024, got 0"),
    "more tokens than the agent allows": BadFlag(
        ("--max-tokens", "4096"), "--max-tokens: must be 1-1024, got 4096"
    ),
    "a temperature out of range": BadFlag(
        ("--temperature", "3"), "--temperature: must be 0-2, got 3"
    ),
    "a top-p out of range": BadFlag(("--top-p", "1.5"), "--top-p: must be 0-1, got 1.5"),
    "an empty prompt": BadFlag(("--prompt", "  "), "--prompt: empty"),
    "a missing token file": BadFlag(
        ("--token-file", "/nonexistent/tok"), "--token-file /nonexistent/tok: no such file"
    ),
    "a missing CA file": BadFlag(
        ("--ca-file", "/nonexistent/ca.pem"), "--ca-file /nonexistent/ca.pem: no such file"
    ),
    "a schema and a grammar": BadFlag(
        ("--json-schema", "s.json", "--grammar", "g.gbnf"),
        "--json-schema and --grammar exclude each other",
    ),
    "the context size, an agent setting": BadFlag(
        ("--ctx-size", "4096"),
        "--ctx-size: the agent's setting when it starts llama-server, not a request's: "
        "decoder.ctx_size in /etc/pi-agent/agent.toml (pi_agent role: pi_agent_ctx_size)",
    ),
    "the batch size in the seed's spelling": BadFlag(
        ("--batch_size", "64"), "--batch-size: the agent's setting"
    ),
    "the KV-cache type": BadFlag(("--cache-type", "q8_0"), "decoder.cache_type_k and cache_type_v"),
    "the prompt cache": BadFlag(("--no-cache-prompt",), "--cache-prompt: the agent's setting"),
}


@pytest.mark.parametrize("case", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_a_bad_flag_is_one_line_naming_it(
    case: BadFlag, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(case.argv)
    if case.argv and "--agent" not in argv:
        argv = ["--agent", AGENT, *argv]
    code = cli.main(["chat", *argv])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("distill chat: error: ")
    assert case.message in err[0]
    assert captured.out == ""


def test_a_schema_file_that_is_not_a_json_object_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "s.json"
    schema.write_text("[1, 2]")
    code = cli.main(["chat", "--agent", AGENT, "--json-schema", str(schema), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"distill chat: error: --json-schema {schema}: a JSON Schema is an object, got list"
    ]


def test_the_request_holds_only_fields_the_agent_accepts() -> None:
    schema = {"type": "object"}
    body = chat_body(
        [{"role": "user", "content": "Salut"}], 32, temperature=0.0, seed=7, schema=schema
    )
    assert body == {
        "messages": [{"role": "user", "content": "Salut"}],
        "max_tokens": 32,
        "temperature": 0.0,
        "seed": 7,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    }
    assert chat_body([{"role": "user", "content": "x"}], 8, grammar='root ::= "oui"') == {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 8,
        "grammar": 'root ::= "oui"',
    }


def test_a_long_conversation_keeps_the_system_message_and_the_latest_turns() -> None:
    turns = [{"role": "user", "content": str(i)} for i in range(100)]
    messages = chat_body([{"role": "system", "content": "sys"}, *turns], 8)["messages"]
    assert len(messages) == MAX_MESSAGES
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[1]["content"] == str(100 - MAX_MESSAGES + 1)
    assert messages[-1]["content"] == "99"


def test_the_token_and_the_ca_come_from_the_fleet_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path))
    (tmp_path / "fleet" / "tokens").mkdir(parents=True)
    (tmp_path / "fleet" / "tokens" / "pi-1").write_text("by-name\n")
    (tmp_path / "fleet" / "tokens" / "10.0.0.11").write_text("by-address\n")
    assert token_for(ChatArgs(agent="https://10.0.0.11:8470", host="pi-1")) == "by-name"
    assert token_for(ChatArgs(agent="https://10.0.0.11:8470")) == "by-address"
    assert token_for(ChatArgs(agent="https://10.0.0.12:8470")) is None
    assert fleet_ca() is None
    (tmp_path / "fleet" / "ca").mkdir()
    (tmp_path / "fleet" / "ca" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert fleet_ca() == tmp_path / "fleet" / "ca" / "ca.pem"


def test_one_shot_streams_the_answer_and_reports_tokens_per_second(tmp_path: Path) -> None:
    token = tmp_path / "tok"
    token.write_text("t\n")
    out, err = io.StringIO(), io.StringIO()
    with FakeAgent(token="t", answer=("Ben", " oui"), tokens_per_s=21.0) as agent:
        args = ChatArgs(
            agent=agent.url, token_file=token, prompt="Ça va?", system="Réponds en joual."
        )
        summary = run(args, stdout=out, stderr=err)
    assert out.getvalue() == "Ben oui\n"
    assert "2 tokens, 21.0 tok/s" in err.getvalue()
    assert summary["tokens_per_s"] == 21.0 and summary["completion_tokens"] == 2
    assert agent.chats[0]["messages"] == [
        {"role": "system", "content": "Réponds en joual."},
        {"role": "user", "content": "Ça va?"},
    ]
    assert agent.chats[0]["stream_options"] == {"include_usage": True}


def test_the_interactive_loop_keeps_the_conversation_until_reset(tmp_path: Path) -> None:
    token = tmp_path / "tok"
    token.write_text("t\n")
    stdin = io.StringIO("Salut\n\nEt toi?\n/reset\nAllô\n/quit\nnever sent\n")
    out, err = io.StringIO(), io.StringIO()
    with FakeAgent(token="t", answer=("Oui",)) as agent:
        summary = run(ChatArgs(agent=agent.url, token_file=token), stdin, out, err)
    assert [len(chat["messages"]) for chat in agent.chats] == [1, 3, 1]
    assert agent.chats[1]["messages"][1] == {"role": "assistant", "content": "Oui"}
    assert out.getvalue() == "Oui\n" * 3
    assert summary["turns"] == 3
    assert "(new conversation)" in err.getvalue()


def test_a_refused_token_ends_one_shot_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "tok"
    token.write_text("wrong\n")
    with FakeAgent(token="t") as agent:
        argv = ["chat", "--agent", agent.url, "--token-file", str(token), "--prompt", "Salut"]
        code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("distill chat: error: token refused (403")


def test_an_unreachable_agent_is_an_agent_error() -> None:
    stream = AgentConnection("http://127.0.0.1:1", "t").stream_chat(
        {"messages": [{"role": "user", "content": "x"}]}
    )
    with pytest.raises(AgentError, match=r"^unreachable: "):
        next(stream)


def test_the_summary_line_is_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "tok"
    token.write_text("t\n")
    with FakeAgent(token="t", answer=("Oui",), tokens_per_s=5.0) as agent:
        code = cli.main(["chat", "--agent", agent.url, "--token-file", str(token), "--prompt", "?"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == "Oui"
    assert json.loads(lines[-1])["tokens_per_s"] == 5.0
