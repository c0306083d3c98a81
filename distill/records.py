"""Rows of pidistill's JSONL files: the one reader, the one writer and the one prompt builder.

Every command that reads prompt rows (``distill label``, ``distill card``, ``distill train``) goes
through :func:`read_records`, so a bad row fails the same way everywhere: one line
``path:line: field: what is wrong`` and nothing written. Labelling and training both build their
prompts with :func:`render_prompt`, so the student sees exactly what the teacher saw.

A row::

    {"id": "qd-0001", "system_hint": "Tu es ...", "user": "...", "requires_json": true,
     "json_schema": {"type": "object", ...}, "split": "train",
     "metadata": {"register": "familier", "dialect": "québécois",
                  "provenance": {"source": "pidistill-authors"}}}

A labelled row adds ``assistant`` (the teacher's answer) and ``metadata.provenance.labeller``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PromptStyle = Literal["plain", "chat"]
PROMPT_STYLES: tuple[str, ...] = ("plain", "chat")
SPLITS: tuple[str, ...] = ("train", "heldout")
REQUIRED_FIELDS: tuple[str, ...] = (
    "id",
    "system_hint",
    "user",
    "requires_json",
    "json_schema",
    "metadata",
)
REQUIRED_METADATA: tuple[str, ...] = ("register", "dialect", "provenance")
SEPARATOR = "\n\n"
JSON_INSTRUCTIONS = (
    "Answer with one JSON object only, no prose and no code fence, "
    "valid against this JSON Schema:\n{schema}"
)


class RecordError(ValueError):
    """A row that cannot be used; ``str()`` is the one-line ``path:line: field: problem``."""

    def __init__(self, path: str | os.PathLike[str], line: int, field_name: str, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field_name
        self.problem = problem
        super().__init__(f"{self.path}:{line}: {field_name}: {problem}")


@dataclass(frozen=True)
class Record:
    """One validated prompt row, with its answer once labelled."""

    id: str
    system_hint: str
    user: str
    requires_json: bool
    json_schema: dict[str, Any] | None
    metadata: dict[str, Any]
    split: str = "train"
    assistant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The row as written to JSONL: known fields first, unknown ones kept as they came."""
        row: dict[str, Any] = {
            "id": self.id,
            "system_hint": self.system_hint,
            "user": self.user,
            "requires_json": self.requires_json,
            "json_schema": self.json_schema,
            "split": self.split,
            "metadata": self.metadata,
        }
        if self.assistant is not None:
            row["assistant"] = self.assistant
        row.update(self.extra)
        return row

    @property
    def where(self) -> str:
        """``path:line`` of the row, for messages."""
        return f"{self.source}:{self.line}"


# ----------------------------------------------------------------------------- validation


def _check_type(value: Any, expected: type | tuple[type, ...], name: str) -> str | None:
    # bool is an int in Python; a JSON boolean is never a valid string or count here.
    if isinstance(value, bool) and bool not in (
        expected if isinstance(expected, tuple) else (expected,)
    ):
        return f"expected {_type_name(expected)}, got boolean"
    if not isinstance(value, expected):
        return f"expected {_type_name(expected)}, got {_json_type(value)}"
    return None


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {str: "string", bool: "boolean", dict: "object", list: "array", type(None): "null"}
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _json_type(value: Any) -> str:
    return (
        _type_name(type(value))
        if type(value) in (str, bool, dict, list, type(None))
        else ("number" if isinstance(value, int | float) else type(value).__name__)
    )


def record_from_dict(
    row: Any, *, path: str | os.PathLike[str] = "<row>", line: int = 0, require_answer: bool = False
) -> Record:
    """Validate one decoded row; return a :class:`Record` or raise :class:`RecordError`."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    def fail(name: str, problem: str) -> RecordError:
        return RecordError(path, line, name, problem)

    if not isinstance(row, dict):
        raise fail("(row)", f"expected a JSON object, got {_json_type(row)}")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise fail(name, "missing required field")
    for name, expected in (
        ("id", str),
        ("system_hint", str),
        ("user", str),
        ("requires_json", bool),
        ("json_schema", (dict, type(None))),
        ("metadata", dict),
    ):
        problem = _check_type(row[name], expected, name)
        if problem:
            raise fail(name, problem)
    if not row["id"].strip():
        raise fail("id", "must not be empty")
    if not row["user"].strip():
        raise fail("user", "must not be empty")
    schema = row["json_schema"]
    if row["requires_json"] and schema is None:
        raise fail("json_schema", "required when requires_json is true")
    if schema is not None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as err:
            raise fail("json_schema", f"invalid JSON Schema: {err.message}") from None
    metadata = row["metadata"]
    for name in REQUIRED_METADATA:
        if name not in metadata:
            raise fail(f"metadata.{name}", "missing required field")
    for name in ("register", "dialect"):
        problem = _check_type(metadata[name], str, name)
        if problem:
            raise fail(f"metadata.{name}", problem)
    problem = _check_type(metadata["provenance"], dict, "provenance")
    if problem:
        raise fail("metadata.provenance", problem)
    split = row.get("split", "train")
    if split not in SPLITS:
        raise fail("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    assistant = row.get("assistant")
    if assistant is not None:
        problem = _check_type(assistant, str, "assistant")
        if problem:
            raise fail("assistant", problem)
    if require_answer and not (assistant or "").strip():
        raise fail("assistant", "missing answer (label this row first)")
    known = {*REQUIRED_FIELDS, "split", "assistant"}
    return Record(
        id=row["id"],
        system_hint=row["system_hint"],
        user=row["user"],
        requires_json=row["requires_json"],
        json_schema=schema,
        metadata=metadata,
        split=split,
        assistant=assistant,
        extra={k: v for k, v in row.items() if k not in known},
        source=str(path),
        line=line,
    )


# ----------------------------------------------------------------------------- reading


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)`` for each non-blank line of a JSONL file.

    Raises :class:`RecordError` for bytes that are not UTF-8 and for lines that are not JSON.
    """
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(
                    path,
                    number,
                    "(encoding)",
                    f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})",
                ) from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordError(
                    path, number, "(json)", f"malformed JSON: {err.msg} at column {err.colno}"
                ) from None


def read_records(
    path: str | os.PathLike[str], *, require_answer: bool = False, allow_empty: bool = False
) -> list[Record]:
    """Read and validate every row of one JSONL file (ids unique within it)."""
    return read_many([path], require_answer=require_answer, allow_empty=allow_empty)


def read_many(
    paths: Sequence[str | os.PathLike[str]],
    *,
    require_answer: bool = False,
    allow_empty: bool = False,
) -> list[Record]:
    """Read and validate several JSONL files; ids must be unique across all of them."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_file():
            raise RecordError(path, 0, "(file)", "no such file")
        count = 0
        for number, row in iter_json_lines(path):
            record = record_from_dict(row, path=path, line=number, require_answer=require_answer)
            if record.id in seen:
                first = seen[record.id]
                raise RecordError(
                    path, number, "id", f"duplicate id {record.id!r} (first seen at {first})"
                )
            seen[record.id] = f"{path}:{number}"
            records.append(record)
            count += 1
        if count == 0 and not allow_empty:
            raise RecordError(path, 1, "(file)", "empty: no rows")
    return records


# ----------------------------------------------------------------------------- writing


def dumps_row(row: Mapping[str, Any]) -> str:
    """One row as a JSONL line (with its newline); accents kept readable."""
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def append_rows(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows in one write, then flush and fsync: a crash leaves at most a torn last line."""
    payload = "".join(dumps_row(row) for row in rows).encode("utf-8")
    if not payload:
        return 0
    with Path(path).open("ab") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return len(payload)


def repair_torn_tail(path: str | os.PathLike[str]) -> int:
    """Cut a last line that a crash left without its newline; return the bytes removed.

    :func:`append_rows` writes whole lines, so a line without its newline can only be the
    torn end of an interrupted append, never a finished row.
    """
    target = Path(path)
    if not target.exists():
        return 0
    size = target.stat().st_size
    if size == 0:
        return 0
    with target.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the last newline in chunks; the torn line can be long.
        position = size
        keep = 0
        while position > 0:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            chunk = handle.read(step)
            index = chunk.rfind(b"\n")
            if index >= 0:
                keep = position + index + 1
                break
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return size - keep


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write a whole file so that readers see the old or the new content, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """:func:`atomic_write_text` for a JSON document (indented, accents kept)."""
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_rows_atomic(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace a JSONL file in one atomic step."""
    atomic_write_text(path, "".join(dumps_row(row) for row in rows))


# ----------------------------------------------------------------------------- prompts


def json_instructions(schema: Mapping[str, Any]) -> str:
    """The sentence appended to a ``requires_json`` prompt, with the compact schema."""
    return JSON_INSTRUCTIONS.format(
        schema=json.dumps(schema, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    )


def user_text(record: Record) -> str:
    """The user's turn: the user text, then the JSON instructions when the row needs JSON."""
    parts = [record.user.strip()]
    if record.requires_json and record.json_schema is not None:
        parts.append(json_instructions(record.json_schema))
    return SEPARATOR.join(parts)


def build_messages(record: Record) -> list[dict[str, str]]:
    """Chat messages for the row: an optional system turn, then the user turn."""
    messages = []
    if record.system_hint.strip():
        messages.append({"role": "system", "content": record.system_hint.strip()})
    messages.append({"role": "user", "content": user_text(record)})
    return messages


def build_prompt(record: Record) -> str:
    """The plain prompt: system hint, user text and JSON instructions joined by blank lines."""
    parts = [record.system_hint.strip(), user_text(record)]
    return SEPARATOR.join(part for part in parts if part) + SEPARATOR


def render_prompt(record: Record, style: PromptStyle = "plain", tokenizer: Any = None) -> str:
    """The exact text the model is conditioned on, for labelling and for training alike.

    ``plain`` joins the parts with blank lines and ends with one, where the answer starts.
    ``chat`` uses the tokenizer's chat template with the generation prompt added.
    """
    if style == "plain":
        return build_prompt(record)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat prompt style needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            build_messages(record), tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt style {style!r} (expected one of {PROMPT_STYLES})")


# ----------------------------------------------------------------------------- JSON answers


def extract_json(answer: str) -> Any:
    """Decode the first JSON value in an answer, tolerating a code fence or a lead-in sentence."""
    text = answer.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                value, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            return value
    raise ValueError("no JSON value found in the answer")


def check_json_answer(answer: str, schema: Mapping[str, Any]) -> str | None:
    """``None`` when the answer holds a JSON value valid against the schema, else why not."""
    from jsonschema import Draft202012Validator

    try:
        value = extract_json(answer)
    except ValueError as err:
        return str(err)
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        return f"schema violation at {where}: {first.message}"
    return None
