"""The help screen: what each screen is for and every key binding, read from the bindings."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

if TYPE_CHECKING:
    from textual.screen import Screen

INTRO = """\
# fleet-tui

| key | screen | what it is for |
| --- | --- | --- |
| F2 | Fleet | inventory groups and hosts, each agent's live status; select hosts to limit a run |
| F3 | Run | run a playbook through ansible-runner: one row per task and host, log, recap |
| F4 | Pipeline | label, train, export, eval forms built from `distill.ops`; live log and progress |
| F5 | Bench | the fleet benchmark report: table and chart, slow hosts in red |
| F6 | Chat | ask a host or a whole group; answers stream in with their tokens/s |

Every run's events are saved under `runs/tui/<time>/events.jsonl` and can be replayed.
"""


KEY_NAMES = {"question_mark": "?", "space": "space", "escape": "esc"}


def _key(keys: str) -> str:
    """``f1,question_mark`` -> ``f1 / ?``."""
    return " / ".join(KEY_NAMES.get(k, k) for k in keys.split(","))


def _keys(screen: Screen[object] | type) -> list[tuple[str, str]]:
    rows = []
    for binding in getattr(screen, "BINDINGS", []):
        if isinstance(binding, Binding) and binding.show and binding.description:
            rows.append((binding.key_display or _key(binding.key), binding.description))
        elif isinstance(binding, tuple) and len(binding) >= 3:
            rows.append((_key(binding[0]), binding[2]))
    return rows


class HelpScreen(ModalScreen[None]):
    """Every screen's bindings, as tables."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,question_mark,q", "close", "Close", priority=True)
    ]

    def __init__(self, sections: dict[str, list[tuple[str, str]]]) -> None:
        super().__init__()
        self.sections = sections

    @classmethod
    def for_screens(cls, screens: dict[str, type]) -> HelpScreen:
        """Help built from the bindings of the app and of each screen class."""
        return cls({title: _keys(screen) for title, screen in screens.items()})

    def compose(self) -> ComposeResult:
        parts = [INTRO]
        for title, keys in self.sections.items():
            if not keys:
                continue
            parts.append(f"\n## {title}\n\n| key | action |\n| --- | --- |")
            parts += [f"| `{key}` | {description} |" for key, description in keys]
        with VerticalScroll(id="help-box"):
            yield Markdown("\n".join(parts), id="help-text")

    def action_close(self) -> None:
        self.dismiss()
