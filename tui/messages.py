"""Messages that worker threads post to the UI; the only way background work reaches a screen.

Textual's ``post_message`` is thread-safe, so the ansible-runner event handler, the pipeline's
process reader, the agent poller and the chat streams build one of these and post it; screens act
on them in the event loop. A replayed event stream goes through the very same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


class RunnerEvent(Message):
    """One ansible-runner event (the dict runner hands to ``event_handler``, or a replayed line)."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__()
        self.event = event


class RunFinished(Message):
    """A playbook run (or a replay) ended: runner's status (successful, failed, canceled...)."""

    def __init__(self, status: str, rc: int | None, error: str = "") -> None:
        super().__init__()
        self.status = status
        self.rc = rc
        self.error = error


class ProcessOutput(Message):
    """One line of a pipeline command's output (stdout or stderr)."""

    def __init__(self, line: str, stream: str = "stderr") -> None:
        super().__init__()
        self.line = line
        self.stream = stream


class ProcessProgress(Message):
    """A progress update parsed from a tqdm bar: percent done and the bar's text."""

    def __init__(self, percent: float, text: str) -> None:
        super().__init__()
        self.percent = percent
        self.text = text


class ProcessExited(Message):
    """A pipeline command ended with this exit code (negative: killed by a signal)."""

    def __init__(self, returncode: int | None, error: str = "") -> None:
        super().__init__()
        self.returncode = returncode
        self.error = error


@dataclass(frozen=True)
class HostUpdate:
    """What the fleet screen knows about one host after a poll."""

    host: str
    status: Any  # tui.agent.AgentStatus, kept loose so messages import nothing heavy
    error: str = ""


class AgentPolled(Message):
    """One round of agent polls finished."""

    def __init__(
        self,
        updates: list[HostUpdate],
        gateway: dict[str, str] | None = None,
        gateway_error: str = "",
    ) -> None:
        super().__init__()
        self.updates = updates
        # Each board's state at the gateway (None: the inventory has no gateway).
        self.gateway = gateway
        self.gateway_error = gateway_error


class ChatPiece(Message):
    """A piece of one host's streamed answer."""

    def __init__(self, host: str, text: str) -> None:
        super().__init__()
        self.host = host
        self.text = text


class ChatDone(Message):
    """One host's answer ended: its stats (``distill.agent_client.ChatStats``), or why not."""

    def __init__(self, host: str, stats: Any = None, error: str = "") -> None:
        super().__init__()
        self.host = host
        self.stats = stats
        self.error = error
