"""The one reader, writer and prompt builder; a bad row fails as ``path:line: field: problem``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from distill import records
from distill.records import Record, RecordError

GOOD = {
    "id": "r1",
    "system_hint": "Tu es un assistant québécois.",
    "user": "Salut, ça va-tu?",
    "requires_json": False,
    "json_schema": None,
    "split": "train",
    "metadata": {"register": "familier", "dialect": "québécois", "provenance": {"source": "t"}},
}
SCHEMA = {
    "type": "object",
    "properties": {"ville": {"type": "string"}, "degres": {"type": "integer"}},
    "required": ["ville", "degres"],
    "additionalProperties": False,
}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with path.open("wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else line.encode() + b"\n")
    return path


def row(**changes) -> str:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data, ensure_ascii=False)


@dataclass
class BadCase:
    lines: list[str | bytes]
    line: int
    field: str
    problem: str


BAD_CASES = {
    "malformed JSON on line 2": BadCase([row(), '{"id": "r2",'], 2, "(json)", "malformed JSON"),
    "a missing user field": BadCase([row(user=...)], 1, "user", "missing required field"),
    "requires_json given as a string": BadCase(
        [row(requires_json="yes")], 1, "requires_json", "expected boolean, got string"
    ),
    "an id that is a number": BadCase([row(id=7)], 1, "id", "expected string, got number"),
    "a duplicate id": BadCase([row(), row()], 2, "id", "duplicate id 'r1'"),
    "an invalid json_schema": BadCase(
        [row(requires_json=True, json_schema={"type": "objet"})],
        1,
        "json_schema",
        "invalid JSON Schema",
    ),
    "requires_json without a schema": BadCase(
        [row(requires_json=True)], 1, "json_schema", "required when requires_json is true"
    ),
    "a register that is not a string": BadCase(
        [row(metadata={"register": 3})], 1, "metadata.register", "expected string, got number"
    ),
    "metadata that is a list": BadCase([row(metadata=[])], 1, "metadata", "expected object"),
    "a history that starts with the assistant": BadCase(
        [row(history=[{"role": "assistant", "content": "Allo!"}])],
        1,
        "history[0].role",
        "expected user",
    ),
    "a history that ends on a user turn": BadCase(
        [row(history=[{"role": "user", "content": "Allo!"}])],
        1,
        "history[0]",
        "must be the assistant's",
    ),
    "a turn with an unknown role": BadCase(
        [row(history=[{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])],
        1,
        "history[0].role",
        "must be one of user, assistant, got 'tool'",
    ),
    "a turn with an empty content": BadCase(
        [row(history=[{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}])],
        1,
        "history[1].content",
        "must not be empty",
    ),
    "a turn with an unknown field": BadCase(
        [row(history=[{"role": "user", "content": "x", "name": "bob"}])],
        1,
        "history[0].name",
        "unknown field",
    ),
    "a reference that is a number": BadCase(
        [row(reference=3)], 1, "reference", "expected string or null, got number"
    ),
    "an unknown split": BadCase([row(split="test")], 1, "split", "must be one of"),
    "non-UTF-8 bytes": BadCase(
        [row(), b'{"id": "r2", "user": "caf\xe9"}\n'], 2, "(encoding)", "not UTF-8"
    ),
    "an empty file": BadCase([], 1, "(file)", "empty"),
    "only blank lines": BadCase(["", "   "], 1, "(file)", "empty"),
    "a row that is a list": BadCase(["[1, 2]"], 1, "(row)", "expected a JSON object"),
    "an empty user text": BadCase([row(user="  ")], 1, "user", "must not be empty"),
}


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_rows_fail_with_path_line_and_field(tmp_path: Path, case: BadCase) -> None:
    path = write_lines(tmp_path / "in.jsonl", case.lines)
    with pytest.raises(RecordError) as caught:
        records.read_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{case.line}: {case.field}: "), message
    assert case.problem in message
    assert "\n" not in message


def test_a_row_of_user_text_alone_gets_the_defaults(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", ['{"user": "Y fait-tu frette dehors?"}'])
    (record,) = records.read_records(path)
    assert (record.system_hint, record.requires_json, record.json_schema, record.split) == (
        "",
        False,
        None,
        "train",
    )
    assert record.history == ()
    assert record.reference is None
    assert record.metadata == {"provenance": {"id_derived": True}}
    assert (record.meta("register"), record.meta("dialect")) == ("unspecified", "unspecified")
    assert records.build_prompt(record) == "Y fait-tu frette dehors?\n\n"


def test_a_missing_id_is_derived_from_the_prompt_and_recorded(tmp_path: Path) -> None:
    lines = ['{"user": "Allo!"}', '{"user": "Bonjour!", "metadata": {"topic": "salut"}}']
    first = records.read_records(write_lines(tmp_path / "a.jsonl", lines))
    again = records.read_records(write_lines(tmp_path / "b.jsonl", lines))
    assert [r.id for r in first] == [r.id for r in again]
    assert first[0].id != first[1].id
    assert all(r.id.startswith("row-") and r.id_derived for r in first)
    assert first[1].metadata == {"topic": "salut", "provenance": {"id_derived": True}}
    # Defaults spelled out, metadata or an answer do not change it; the prompt does.
    spelled = {"user": "Allo!", "system_hint": "", "requires_json": False, "json_schema": None}
    assert records.derive_id({**spelled, "assistant": "Salut!"}) == first[0].id
    assert records.derive_id({"user": "Allo!", "system_hint": "Sois poli."}) != first[0].id
    # Written back (as a labelled row is), the id is kept and still reads as derived.
    (back,) = [records.record_from_dict(first[0].to_dict())]
    assert (back.id, back.id_derived) == (first[0].id, True)
    given = records.read_records(write_lines(tmp_path / "c.jsonl", [row()]))
    assert not given[0].id_derived


def test_the_same_prompt_twice_without_ids_is_a_duplicate(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", ['{"user": "Allo!"}', '{"user": "Allo!"}'])
    with pytest.raises(RecordError, match=r"in.jsonl:2: id: duplicate id 'row-\w+' derived"):
        records.read_records(path)


def test_the_row_schema_file_is_a_valid_schema_that_names_every_field() -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(records.SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]) == set(records.FIELDS)
    assert schema["required"] == ["user"]
    assert all(schema["properties"][name].get("description") for name in records.FIELDS)
    # Another tool reading the file alone judges rows as pidistill does.
    validator = Draft202012Validator(schema)
    assert validator.is_valid(json.loads(row()))
    assert validator.is_valid({"user": "Allo!"})
    assert not validator.is_valid({"id": "x"})
    assert not validator.is_valid({"user": "a", "requires_json": True})


def test_the_fast_validator_agrees_with_the_python_one() -> None:
    from jsonschema import Draft202012Validator

    fast = records._fast_validator()
    if fast is None:
        pytest.skip("jsonschema-rs is not installed (the Python validator does it all)")
    python = Draft202012Validator(records.row_schema())
    rows = [json.loads(row()), {"user": "x"}, {"user": "x", "history": CONVERSATION}]
    for case in BAD_CASES.values():
        for line in case.lines:
            try:
                rows.append(json.loads(line))
            except (ValueError, UnicodeDecodeError):
                continue
    assert len(rows) > 15
    for value in rows:
        assert fast.is_valid(value) == python.is_valid(value), value


def test_duplicate_ids_across_files_name_the_first_place(tmp_path: Path) -> None:
    first = write_lines(tmp_path / "a.jsonl", [row()])
    second = write_lines(tmp_path / "b.jsonl", [row(id="r2"), row()])
    with pytest.raises(
        RecordError, match=rf"b.jsonl:2: id: duplicate id 'r1' \(first seen at {first}:1\)"
    ):
        records.read_many([first, second])


def test_unknown_fields_survive_a_round_trip(tmp_path: Path) -> None:
    data = json.loads(row())
    data["notes"] = {"x": 1}
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(data)])
    (record,) = records.read_records(path)
    assert record.to_dict()["notes"] == {"x": 1}
    assert record.where == f"{path}:1"


def test_require_answer_rejects_unlabelled_rows(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [row(assistant="Oui."), row(id="r2")])
    with pytest.raises(RecordError, match=r":2: assistant: missing answer"):
        records.read_records(path, require_answer=True)


def make(**changes) -> Record:
    return records.record_from_dict({**json.loads(row()), **changes})


def test_plain_prompt_joins_parts_with_blank_lines() -> None:
    assert records.build_prompt(make()) == ("Tu es un assistant québécois.\n\nSalut, ça va-tu?\n\n")


def test_plain_prompt_without_system_hint_starts_with_the_user() -> None:
    assert records.build_prompt(make(system_hint="")) == "Salut, ça va-tu?\n\n"


def test_json_rows_carry_the_schema_instructions() -> None:
    prompt = records.build_prompt(make(requires_json=True, json_schema=SCHEMA))
    hint, user, instructions, tail = prompt.split("\n\n")
    assert (hint, user, tail) == ("Tu es un assistant québécois.", "Salut, ça va-tu?", "")
    assert instructions.startswith("Answer with one JSON object only")
    assert json.loads(instructions.split("\n", 1)[1]) == SCHEMA


def test_chat_prompt_uses_the_tokenizer_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = records.render_prompt(make(), "chat", tokenizer)
    assert prompt == (
        "<|im_start|>system\nTu es un assistant québécois.<|im_end|>\n"
        "<|im_start|>user\nSalut, ça va-tu?<|im_end|>\n<|im_start|>assistant\n"
    )


CONVERSATION = [
    {"role": "user", "content": "Allo, t'es-tu là?"},
    {"role": "assistant", "content": "Oui, je t'écoute!"},
]


def test_a_conversation_keeps_its_history_through_a_round_trip() -> None:
    record = make(history=CONVERSATION, reference="Une réponse venue d'ailleurs.")
    assert record.turns == 2
    again = records.record_from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == records.record_from_dict(record.to_dict())
    assert list(again.history) == CONVERSATION
    assert again.reference == "Une réponse venue d'ailleurs."
    assert list(record.to_dict())[:4] == ["id", "system_hint", "history", "user"]
    assert "history" not in make().to_dict() and "reference" not in make().to_dict()


def test_plain_prompt_of_a_conversation_names_each_turn() -> None:
    prompt = records.build_prompt(make(history=CONVERSATION))
    assert prompt == (
        "Tu es un assistant québécois.\n\nUser: Allo, t'es-tu là?\n\n"
        "Assistant: Oui, je t'écoute!\n\nUser: Salut, ça va-tu?\n\nAssistant:\n"
    )


def test_chat_prompt_of_a_conversation_holds_every_turn(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    record = make(history=CONVERSATION, requires_json=True, json_schema=SCHEMA)
    assert [m["role"] for m in records.build_messages(record)] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    prompt = records.render_prompt(record, "chat", tokenizer)
    assert prompt.startswith(
        "<|im_start|>system\nTu es un assistant québécois.<|im_end|>\n"
        "<|im_start|>user\nAllo, t'es-tu là?<|im_end|>\n"
        "<|im_start|>assistant\nOui, je t'écoute!<|im_end|>\n"
        "<|im_start|>user\nSalut, ça va-tu?\n\nAnswer with one JSON object"
    )
    # The JSON instructions belong to the last user turn only.
    assert prompt.count("Answer with one JSON object") == 1
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_prompt_without_template_is_refused() -> None:
    with pytest.raises(ValueError, match="chat template"):
        records.render_prompt(make(), "chat", tokenizer=None)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ('{"ville": "Québec", "degres": -12}', None),
        ('```json\n{"ville": "Québec", "degres": -12}\n```', None),
        ('Voici: {"ville": "Québec", "degres": -12} voilà', None),
        ('{"ville": "Québec"}', "'degres' is a required property"),
        ('{"ville": "Québec", "degres": "frette"}', "schema violation at degres"),
        ("Il fait frette.", "no JSON value found"),
    ],
    ids=["bare object", "code fence", "lead-in sentence", "missing field", "wrong type", "prose"],
)
def test_json_answers_are_checked_against_the_schema(answer: str, problem: str | None) -> None:
    result = records.check_json_answer(answer, SCHEMA)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def test_append_then_repair_cuts_only_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    records.append_rows(path, [{"id": "a"}, {"id": "b"}])
    with path.open("ab") as handle:
        handle.write(b'{"id": "c", "assis')
    assert records.repair_torn_tail(path) == len(b'{"id": "c", "assis')
    assert [r["id"] for _, r in records.iter_json_lines(path)] == ["a", "b"]
    assert records.repair_torn_tail(path) == 0


def test_repair_of_a_file_that_is_one_torn_line_empties_it(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"')
    records.repair_torn_tail(path)
    assert path.read_bytes() == b""


def test_atomic_write_leaves_no_temp_file_and_replaces_content(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "card.md"
    records.atomic_write_text(path, "one")
    records.atomic_write_text(path, "deux")
    assert path.read_text() == "deux"
    assert sorted(p.name for p in path.parent.iterdir()) == ["card.md"]
