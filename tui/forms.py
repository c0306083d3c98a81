"""From ``distill.ops.fields`` to form widgets and back: which widget a flag gets, and how the
text a user typed becomes the value the stage's dataclass expects.

``ops.fields`` gives each flag's type as the annotation's text (``"int"``, ``"Path | None"``,
``"list[Path]"``); ``convert`` turns a widget's value into that type or raises ``ValueError``
naming the flag, so a bad form value is one notification, never a traceback.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "Path": Path, "bool": bool}


@dataclass(frozen=True)
class FieldType:
    """A parsed annotation: ``list[int] | None`` -> base ``int``, is_list, optional."""

    base: str
    is_list: bool = False
    optional: bool = False

    @property
    def widget(self) -> str:
        """``checkbox``, ``integer``, ``number`` or ``text`` (choices are a ``select``)."""
        if self.base == "bool" and not self.is_list:
            return "checkbox"
        if self.is_list:
            return "text"
        return {"int": "integer", "float": "number"}.get(self.base, "text")


def parse_type(text: str) -> FieldType:
    """Parse ``ops.fields``' type text."""
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"] or ["str"]
    base = parts[0]
    is_list = base.startswith("list[") and base.endswith("]")
    if is_list:
        base = base[5:-1].strip()
    return FieldType(base if base in SCALARS else "str", is_list, optional)


def _scalar(base: str, text: str, name: str) -> Any:
    try:
        return SCALARS[base](text)
    except ValueError:
        kind = {"int": "a whole number", "float": "a number"}.get(base, base)
        raise ValueError(f"{name}: expected {kind}, got {text!r}") from None


def convert(field: dict[str, Any], raw: Any) -> Any:
    """The value for ``field`` from a widget's value; ``None`` means "leave it out"."""
    kind = parse_type(str(field.get("type", "str")))
    name = str(field.get("flag") or field["name"])
    if kind.widget == "checkbox":
        return bool(raw)
    text = "" if raw is None else str(raw).strip()
    if not text:
        return None
    if kind.is_list:
        try:
            words = [w for word in shlex.split(text) for w in word.split(",") if w]
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        return [_scalar(kind.base, w, name) for w in words]
    return _scalar(kind.base, text, name)


def default_text(field: dict[str, Any]) -> str:
    """A field's default as the text a form shows (empty for none)."""
    default = field.get("default")
    if default is None or isinstance(default, bool):
        return ""
    if isinstance(default, list | tuple):
        return " ".join(str(v) for v in default)
    return str(default)
