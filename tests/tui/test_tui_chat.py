"""The chat screen driven with Pilot against stand-in agents (``tui.testing.FakeAgent``, which
streams as llama-server does); the real agent and llama-server are in
``tests/integration/test_chat_agent.py``. Every wait is on a condition (``until``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Select, Static

from tui.agent import Tokens
from tui.app import FleetApp
from tui.screens.chat import ChatScreen
from tui.settings import Settings
from tui.testing import FakeAgent

pytestmark = pytest.mark.anyio
SIZE = (140, 40)
Until = Callable[..., Any]


def fleet_settings(project: Path, inventory: Path, token: Path) -> Settings:
    return Settings(
        project_dir=project,
        inventory=(inventory,),
        tokens=Tokens(token_file=token),
        report=project / "reports" / "fleet-report.csv",
        refresh_s=3600,
        poll_agents=False,
    )


def write_inventory(path: Path, urls: dict[str, str]) -> Path:
    hosts = "".join(f"    {name}: {{pi_agent_url: '{url}'}}\n" for name, url in urls.items())
    path.write_text(f"pi5:\n  hosts:\n{hosts}")
    return path


def status_text(screen: ChatScreen) -> str:
    return str(screen.query_one("#chat-status", Static).render())


async def open_chat(pilot: Any, app: FleetApp, until: Until) -> ChatScreen:
    await pilot.press("f6")
    screen = app.get_screen("chat")
    assert isinstance(screen, ChatScreen)
    await until(pilot, lambda: screen.fleet is not None)
    return screen


async def test_one_host_answers_in_pieces_with_its_tokens_per_second(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    with FakeAgent(token="t", answer=("Ben", " oui", ", ça va!"), tokens_per_s=17.25) as agent:
        inventory = write_inventory(tmp_path / "fleet.yml", {"pi-a": agent.url})
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            assert chat.query_one("#chat-target", Select).value == "host:pi-a"
            await pilot.click("#chat-prompt")
            await pilot.press(*"Salut", "enter")
            await until(pilot, lambda: not chat.busy and "pi-a" in chat.stats)
            assert chat.answers["pi-a"] == "Ben oui, ça va!"
            assert chat.stats["pi-a"].tokens_per_s == 17.25
            assert chat.stats["pi-a"].completion_tokens == 3
            assert "pi-a 17.2 tok/s" in status_text(chat)
            assert chat.query_one("#chat-prompt", Input).value == ""
            # The agent got a streamed request with the host's token and the form's max tokens.
            assert ("/v1/chat/completions", "Bearer t") in agent.requests
            assert agent.chats[0]["stream"] is True
            assert agent.chats[0]["max_tokens"] == 128
            assert agent.chats[0]["messages"] == [{"role": "user", "content": "Salut"}]
            # The next question carries the conversation so far.
            chat.ask("Et toi?")
            await until(pilot, lambda: len(agent.chats) == 2 and not chat.busy)
            assert [m["role"] for m in agent.chats[1]["messages"]] == [
                "user",
                "assistant",
                "user",
            ]
            assert agent.chats[1]["messages"][1]["content"] == "Ben oui, ça va!"
            # ctrl+n forgets it.
            await pilot.press("ctrl+n")
            chat.ask("Allô")
            await until(pilot, lambda: len(agent.chats) == 3 and not chat.busy)
            assert len(agent.chats[2]["messages"]) == 1
            assert app.errors == []


async def test_a_group_asks_every_host_and_a_down_one_says_why(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    with (
        FakeAgent(token="t", answer=("A",), tokens_per_s=9.0) as a,
        FakeAgent(token="t", answer=("B", "B"), tokens_per_s=4.0) as b,
    ):
        urls = {"pi-a": a.url, "pi-b": b.url, "pi-down": "http://127.0.0.1:1"}
        inventory = write_inventory(tmp_path / "fleet.yml", urls)
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            chat.query_one("#chat-target", Select).value = "group:pi5"
            await pilot.pause()
            assert chat.targets() == ["pi-a", "pi-b", "pi-down"]
            chat.ask("Qui est là?")
            await until(pilot, lambda: not chat.busy and len(chat.stats) + len(chat.errors) == 3)
            assert chat.answers == {"pi-a": "A", "pi-b": "BB", "pi-down": ""}
            assert {h: s.tokens_per_s for h, s in chat.stats.items()} == {"pi-a": 9.0, "pi-b": 4.0}
            assert "unreachable" in chat.errors["pi-down"]
            status = status_text(chat)
            assert "pi-a 9.0 tok/s" in status and "pi-b 4.0 tok/s" in status
            assert "pi-down: unreachable" in status
            assert any("Chat with pi-down" in e for e in app.errors)
            # The down host's question is not kept: its next request starts afresh.
            assert chat.histories["pi-down"] == []
            assert len(chat.histories["pi-a"]) == 2


async def test_a_json_schema_goes_out_as_response_format(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    (project / "answer.json").write_text(json.dumps(schema))
    with FakeAgent(token="t", answer=('{"ok": true}',)) as agent:
        inventory = write_inventory(tmp_path / "fleet.yml", {"pi-a": agent.url})
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            chat.query_one("#chat-schema", Input).value = "answer.json"
            chat.query_one("#chat-max-tokens", Input).value = "32"
            chat.ask("Ça va?")
            await until(pilot, lambda: not chat.busy and "pi-a" in chat.stats)
            assert agent.chats[0]["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema},
            }
            assert agent.chats[0]["max_tokens"] == 32


@pytest.mark.parametrize(
    ("max_tokens", "schema_text", "expected"),
    [
        ("0", "", "max tokens: must be 1-1024, got 0"),
        ("2000", "", "max tokens: must be 1-1024, got 2000"),
        ("64", "[1, 2]", "a JSON Schema is an object, got list"),
        ("64", "{not json", "not JSON"),
    ],
    ids=["no tokens", "more tokens than the agent allows", "a list", "broken JSON"],
)
async def test_bad_settings_are_one_error_and_nothing_is_sent(
    tmp_path: Path, project: Path, until: Until, max_tokens: str, schema_text: str, expected: str
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    (project / "bad.json").write_text(schema_text)
    with FakeAgent(token="t") as agent:
        inventory = write_inventory(tmp_path / "fleet.yml", {"pi-a": agent.url})
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            chat.query_one("#chat-max-tokens", Input).value = max_tokens
            if schema_text:
                chat.query_one("#chat-schema", Input).value = "bad.json"
            chat.ask("Salut")
            await pilot.pause()
            assert len(app.errors) == 1 and expected in app.errors[0]
            assert agent.chats == []
            assert not chat.busy


async def test_a_refused_token_is_the_hosts_error(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("wrong\n")
    with FakeAgent(token="t") as agent:
        inventory = write_inventory(tmp_path / "fleet.yml", {"pi-a": agent.url})
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            chat.ask("Salut")
            await until(pilot, lambda: not chat.busy)
            assert chat.errors["pi-a"].startswith("token refused (403")
            assert agent.chats == []


async def test_escape_stops_an_answer_under_way_and_forgets_its_question(
    tmp_path: Path, project: Path, until: Until
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    gap = threading.Event()
    with FakeAgent(token="t", answer=("Un", " deux", " trois"), piece_gap=gap) as agent:
        inventory = write_inventory(tmp_path / "fleet.yml", {"pi-a": agent.url})
        app = FleetApp(fleet_settings(project, inventory, token))
        async with app.run_test(size=SIZE) as pilot:
            chat = await open_chat(pilot, app, until)
            chat.ask("Compte")
            await until(pilot, lambda: chat.answers.get("pi-a") == "Un")
            assert chat.busy
            await pilot.press("escape")
            gap.set()  # the next piece arrives, and the stream sees the stop
            await until(pilot, lambda: not chat.busy)
            assert chat.errors == {"pi-a": "stopped"}
            assert chat.answers["pi-a"] == "Un"
            assert chat.histories["pi-a"] == []
            assert app.errors == []  # stopping is no error
