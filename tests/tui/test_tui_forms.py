"""Form values to stage arguments: every type ``distill.ops.fields`` reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distill import ops
from tui.forms import convert, default_text, parse_type


@dataclass(frozen=True)
class Case:
    type: str
    raw: Any
    expected: Any


CASES = {
    "an int from its text": Case("int", "32", 32),
    "a float from its text": Case("float", "0.5", 0.5),
    "a path becomes a Path": Case("Path", "out.jsonl", Path("out.jsonl")),
    "an empty optional is left out": Case("Path | None", "  ", None),
    "a list of paths splits on spaces and commas": Case(
        "list[Path]", "a.jsonl b.jsonl,c.jsonl", [Path("a.jsonl"), Path("b.jsonl"), Path("c.jsonl")]
    ),
    "quoted words keep their spaces": Case(
        "list[str]", "'q_proj v' k_proj", ["q_proj v", "k_proj"]
    ),
    "a checkbox is a bool": Case("bool", True, True),
    "an optional int": Case("int | None", "7", 7),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_convert(case: Case) -> None:
    assert convert({"name": "x", "flag": "--x", "type": case.type}, case.raw) == case.expected


def test_a_bad_number_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--batch-size: expected a whole number, got 'lots'"):
        convert({"name": "batch_size", "flag": "--batch-size", "type": "int"}, "lots")


def test_widgets_by_type() -> None:
    assert parse_type("bool").widget == "checkbox"
    assert parse_type("int | None").widget == "integer"
    assert parse_type("float").widget == "number"
    assert parse_type("list[Path] | None") == parse_type("list[Path] | None")
    assert parse_type("list[int]").widget == "text"


def test_every_available_stage_field_converts_its_own_default() -> None:
    for stage in ops.STAGES:
        try:
            fields = ops.fields(stage)
        except ops.OpError:
            continue
        for field in fields:
            if field["default"] is None or parse_type(field["type"]).widget == "checkbox":
                continue
            if field["default"] == "":  # an empty box leaves the flag out: the same default
                assert convert(field, default_text(field)) is None, field
                continue
            value = convert(field, default_text(field))
            assert value == field["default"] or str(value) == str(field["default"]), field
