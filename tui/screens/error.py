"""A modal error screen: a title, a one-line reason and the full detail (scrollable)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ErrorScreen(ModalScreen[None]):
    """Shown for errors that need more than a notification (an unreadable inventory...)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter", "dismiss_error", "Close", priority=True)
    ]

    def __init__(self, title: str, message: str, detail: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.message = message
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Static(self.title_text, id="error-title", markup=False)
            yield Static(self.message, id="error-message", markup=False)
            if self.detail and self.detail != self.message:
                with VerticalScroll(id="error-detail"):
                    yield Static(self.detail, markup=False)
            yield Button("Close", id="error-close", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()

    def action_dismiss_error(self) -> None:
        self.dismiss()
