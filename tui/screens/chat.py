"""The chat screen: ask one Pi, or a whole group at once, and watch the answers stream in.

Each host's agent is asked through ``/v1/chat/completions`` with ``stream: true``
(``distill.agent_client``, the client ``distill chat`` uses, with the fleet's CA and the host's
token as the fleet screen reaches agents). Every host keeps its own conversation; ctrl+n starts
new ones, escape stops the answers under way. An answer can be held to a JSON Schema file
(sent as ``response_format``). Each answer ends with its tokens/s, the Pi's own generation rate.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static

from distill.agent_client import CHAT_TIMEOUT, AgentConnection, AgentError, ChatStats
from distill.chat import MAX_TOKENS_LIMIT, chat_body, load_schema
from tui.inventory import Fleet, InventoryError, load_inventory
from tui.messages import ChatDone, ChatPiece

if TYPE_CHECKING:
    from tui.app import FleetApp

DEFAULT_MAX_TOKENS = 128


class ChatScreen(Screen[None]):
    """A target (host or group) and settings on the left, the conversation on the right."""

    AUTO_FOCUS = "#chat-prompt"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop answers"),
        Binding("ctrl+n", "new_chat", "New chat"),
    ]

    def __init__(self) -> None:
        super().__init__(id="chat")
        self.fleet: Fleet | None = None
        self.histories: dict[str, list[dict[str, str]]] = {}
        self.answers: dict[str, str] = {}  # the turn under way (or the last one), per host
        self.stats: dict[str, ChatStats] = {}
        self.errors: dict[str, str] = {}
        self.pending: set[str] = set()
        self.turns = 0
        self._blocks: dict[str, Static] = {}
        self._stop = threading.Event()

    @property
    def fleet_app(self) -> FleetApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    @property
    def busy(self) -> bool:
        """Answers are still streaming."""
        return bool(self.pending)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-body"):
            with Vertical(id="chat-form"):
                yield Label("Ask")
                yield Select[str]([], id="chat-target", prompt="reading the inventory…")
                yield Label(f"Max tokens (1-{MAX_TOKENS_LIMIT})")
                yield Input(str(DEFAULT_MAX_TOKENS), id="chat-max-tokens", type="integer")
                yield Label("JSON Schema file (optional)")
                yield Input(placeholder="schemas/answer.json", id="chat-schema")
            yield VerticalScroll(id="chat-log")
        yield Input(placeholder="Ask the Pi… (enter sends)", id="chat-prompt")
        yield Static("reading the inventory…", id="chat-status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    # inventory

    @work(thread=True, exclusive=True, group="chat-inventory")
    def load(self) -> None:
        """Read the inventory in a thread, as the fleet screen does."""
        settings = self.fleet_app.settings
        try:
            fleet = load_inventory(list(settings.default_inventory()), cwd=settings.project_dir)
        except InventoryError as err:
            self.app.call_from_thread(self._inventory_failed, err)
            return
        self.app.call_from_thread(self._show_targets, fleet)

    def _inventory_failed(self, err: InventoryError) -> None:
        self._status(f"inventory: {err}")
        self.notify(str(err), title="Cannot read the inventory", severity="error")

    def _show_targets(self, fleet: Fleet) -> None:
        self.fleet = fleet
        options = [(name, f"host:{name}") for name in fleet.hosts]
        options += [
            (f"group {group} ({len(members)} hosts)", f"group:{group}")
            for group, members in fleet.groups.items()
        ]
        select = self.query_one("#chat-target", Select)
        select.set_options(options)
        if options:
            select.value = options[0][1]
        self._status(f"{len(fleet.hosts)} hosts; pick one or a group, type, enter")

    def targets(self) -> list[str]:
        """The hosts the next question goes to."""
        value = self.query_one("#chat-target", Select).value
        if self.fleet is None or not isinstance(value, str):
            return []
        kind, _, name = value.partition(":")
        if kind == "group":
            return list(self.fleet.groups.get(name, []))
        return [name] if name in self.fleet.hosts else []

    # asking

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "chat-prompt":
            self.ask(event.value)

    def ask(self, prompt: str) -> None:
        """Send ``prompt`` to every target host, each in its own conversation."""
        prompt = prompt.strip()
        if not prompt:
            return
        if self.busy:
            self.notify("answers are still coming (escape stops them)", severity="warning")
            return
        hosts = self.targets()
        if not hosts or self.fleet is None:
            self.notify("no host to ask: pick a host or a group", severity="warning")
            return
        try:
            settings = self._settings()
        except ValueError as err:
            self.notify(str(err), title="Chat", severity="error")
            return
        self.query_one("#chat-prompt", Input).value = ""
        app_settings = self.fleet_app.settings
        ca_file = app_settings.agent_ca()
        requests: dict[str, tuple[AgentConnection, dict[str, Any]]] = {}
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Static(Text(f"you › {prompt}", style="bold"), classes="chat-user"))
        self.turns += 1
        self._stop.clear()
        self.answers, self.stats, self.errors, self._blocks = {}, {}, {}, {}
        for host in hosts:
            history = self.histories.setdefault(host, [])
            history.append({"role": "user", "content": prompt})
            block = Static(Text(f"{host} › …", style="dim"), classes="chat-answer")
            self._blocks[host] = block
            log.mount(block)
            self.answers[host] = ""
            try:
                token = app_settings.tokens.for_host(host)
            except AgentError as err:
                self._finish(host, None, str(err))
                continue
            connection = AgentConnection(
                self.fleet.hosts[host].agent_url, token, CHAT_TIMEOUT, ca_file
            )
            requests[host] = (connection, chat_body(history, **settings))
            self.pending.add(host)
        log.scroll_end(animate=False)
        self._status(f"asking {', '.join(requests) or 'nobody'}…")
        if requests:
            self._stream(requests)

    def _settings(self) -> dict[str, Any]:
        """max_tokens and the schema from the form; ValueError in one line."""
        raw = self.query_one("#chat-max-tokens", Input).value.strip()
        try:
            max_tokens = int(raw)
        except ValueError:
            raise ValueError(f"max tokens: not a number: {raw!r}") from None
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"max tokens: must be 1-{MAX_TOKENS_LIMIT}, got {max_tokens}")
        settings: dict[str, Any] = {"max_tokens": max_tokens}
        schema = self.query_one("#chat-schema", Input).value.strip()
        if schema:
            path = Path(schema).expanduser()
            path = path if path.is_absolute() else self.fleet_app.settings.project_dir / path
            settings["schema"] = load_schema(path, "JSON Schema file")
        return settings

    @work(thread=True, group="chat")
    def _stream(self, requests: dict[str, tuple[AgentConnection, dict[str, Any]]]) -> None:
        """Stream every host's answer at once; each piece comes back as a message."""

        def one(host: str) -> None:
            connection, body = requests[host]
            stream = connection.stream_chat(body)
            try:
                for piece in stream:
                    if self._stop.is_set():
                        self.post_message(ChatDone(host, None, "stopped"))
                        return
                    if isinstance(piece, str):
                        self.post_message(ChatPiece(host, piece))
                    else:
                        self.post_message(ChatDone(host, piece))
            except AgentError as err:
                self.post_message(ChatDone(host, None, str(err)))
            finally:
                stream.close()  # a stopped answer closes its connection

        with ThreadPoolExecutor(max_workers=min(8, len(requests))) as pool:
            list(pool.map(one, requests))

    def on_chat_piece(self, message: ChatPiece) -> None:
        if message.host not in self.pending:
            return
        self.answers[message.host] += message.text
        self._blocks[message.host].update(Text(f"{message.host} › {self.answers[message.host]}"))
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def on_chat_done(self, message: ChatDone) -> None:
        if message.host in self.pending:
            self._finish(message.host, message.stats, message.error)

    def _finish(self, host: str, stats: ChatStats | None, error: str) -> None:
        self.pending.discard(host)
        history = self.histories.get(host, [])
        block = self._blocks[host]
        answer = self.answers.get(host, "")
        if stats is not None:
            self.stats[host] = stats
            history.append({"role": "assistant", "content": answer})
            text = Text(f"{host} › {answer}\n")
            text.append(f"  {stats.line()}", style="dim green")
        else:
            self.errors[host] = error
            if history and history[-1]["role"] == "user":
                history.pop()  # not answered: the next question starts from the last answer
            text = Text(f"{host} › {answer}\n")
            text.append(f"  {error}", style="bold red" if error != "stopped" else "yellow")
            if error != "stopped":
                self.notify(error, title=f"Chat with {host}", severity="error")
        block.update(text)
        if not self.pending:
            self._status(self._summary())

    def _summary(self) -> str:
        parts = []
        for host in self._blocks:
            stats = self.stats.get(host)
            if stats is not None and stats.tokens_per_s is not None:
                parts.append(f"{host} {stats.tokens_per_s:.1f} tok/s")
            elif stats is not None:
                parts.append(f"{host} answered")
            else:
                parts.append(f"{host}: {self.errors.get(host, '?')}")
        return f"turn {self.turns}: " + " · ".join(parts)

    # actions

    def action_stop(self) -> None:
        if self.busy:
            self._stop.set()
            self._status("stopping…")

    def action_new_chat(self) -> None:
        if self.busy:
            self.notify("answers are still coming (escape stops them)", severity="warning")
            return
        self.histories.clear()
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self._status("new conversation")

    def _status(self, text: str) -> None:
        self.query_one("#chat-status", Static).update(text)
