"""Talk to a Pi for real: ``distill chat`` and fleet-tui's chat screen against the real pi-agent
serving HTTPS (a certificate of a throwaway fleet CA) in front of llama-server on the tiny GGUF."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill import cli
from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess
from tui.agent import Tokens
from tui.app import FleetApp
from tui.screens.chat import ChatScreen
from tui.settings import Settings
from tui.testing import until

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    """Textual's loop."""
    return "asyncio"


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, llama_tools, pi_agent_tiny_gguf: Path, pki
) -> Iterator[AgentProcess]:
    base = tmp_path_factory.mktemp("chat-agent")
    store = ModelStore(base / "state" / "models")
    store.recover()
    store.install_file("tiny-v1", pi_agent_tiny_gguf, name="tiny")
    store.switch("tiny-v1")
    config = {
        "agent": {"tls_cert": pki["cert"], "tls_key": pki["key"]},
        "llama": {"bin_dir": llama_tools.bin, "build": "0c1e570"},
        "decoder": {"ctx_size": 512, "threads": 1, "batch_size": 128, "ubatch_size": 128},
        "encoder": {"enabled": False},
        "metrics": {"vcgencmd": ""},
    }
    context = ssl.create_default_context(cafile=pki["ca"])
    with AgentProcess(base, config, ssl_context=context) as proc:
        proc.wait_for(lambda: proc.request("GET", "/readyz")[0] == 200, timeout=60)
        yield proc


def test_distill_chat_streams_an_answer_with_its_tokens_per_second(
    agent: AgentProcess, pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "--agent", agent.url, "--token-file", str(agent.token_file),
            "--ca-file", str(pki["ca"]), "--prompt", "Salut, ça va?", "--max-tokens", "16",
            "--seed", "1"]  # fmt: skip
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    summary = json.loads(lines[-1])
    assert "".join(lines[:-1]).strip()  # the answer, streamed before the summary
    assert summary["completion_tokens"] > 0
    assert summary["tokens_per_s"] > 0
    assert summary["prompt_tokens"] > 0
    assert " tok/s" in captured.err


def test_a_json_schema_holds_the_answer(agent: AgentProcess, pki, tmp_path: Path, capsys) -> None:
    schema = {"type": "object", "properties": {"oui": {"type": "boolean"}}, "required": ["oui"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    argv = ["chat", "--agent", agent.url, "--token-file", str(agent.token_file),
            "--ca-file", str(pki["ca"]), "--prompt", "Oui ou non?", "--max-tokens", "64",
            "--json-schema", str(tmp_path / "s.json"), "--seed", "1",
            "--temperature", "0"]  # fmt: skip
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answer = json.loads("".join(captured.out.splitlines()[:-1]))
    assert isinstance(answer["oui"], bool)


def test_an_agent_outside_the_ca_is_refused_before_the_token_goes(
    agent: AgentProcess, pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "--agent", agent.url, "--token-file", str(agent.token_file),
            "--ca-file", str(pki["other_ca"]), "--prompt", "Salut"]  # fmt: skip
    assert cli.main(argv) == 1
    assert "certificate not trusted" in capsys.readouterr().err


@pytest.mark.anyio
async def test_the_chat_screen_talks_to_the_real_agent(
    agent: AgentProcess, pki, tmp_path: Path
) -> None:
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(f"pi5:\n  hosts:\n    pi-a: {{pi_agent_url: '{agent.url}'}}\n")
    settings = Settings(
        project_dir=tmp_path,
        inventory=(inventory,),
        tokens=Tokens(token_file=agent.token_file),
        ca_file=pki["ca"],
        poll_agents=False,
    )
    app = FleetApp(settings, mode="chat")
    async with app.run_test(size=(140, 40)) as pilot:
        chat = app.get_screen("chat")
        assert isinstance(chat, ChatScreen)
        await until(pilot, lambda: chat.fleet is not None, timeout=60)
        chat.ask("Salut, ça va?")
        await until(pilot, lambda: not chat.busy, timeout=120)
        assert chat.errors == {}
        assert chat.answers["pi-a"].strip()
        stats = chat.stats["pi-a"]
        assert stats.completion_tokens > 0
        assert stats.tokens_per_s is not None and stats.tokens_per_s > 0
        assert "pi-a" in str(chat.query_one("#chat-status").render())
