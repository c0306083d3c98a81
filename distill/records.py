"""Rows of pidistill's JSONL files: the one reader, the one writer and the one prompt builder.

Every command that reads prompt rows (``distill label``, ``distill card``, ``distill train``) goes
through :func:`read_records`, so a bad row fails the same way everywhere: one line
``path:line: field: what is wrong`` and nothing written. Labelling and training both build their
prompts with :func:`render_prompt`, so the student sees exactly what the teacher saw.

The row format is the JSON Schema ``distill/row.schema.json`` (:func:`row_schema`); rows are
validated against it, then for what a schema cannot say. Only ``user`` is required::

    {"user": "Y fait-tu frette dehors?"}

A full row::

    {"id": "qd-0001", "system_hint": "Tu es ...", "user": "...", "requires_json": true,
     "json_schema": {"type": "object", ...}, "split": "train",
     "metadata": {"register": "familier", "dialect": "québécois",
                  "provenance": {"source": "pidistill-authors"}}}

A conversation carries its earlier turns in ``history`` (user, assistant, ... ending with an
assistant turn); the teacher answers ``user``, the last user turn, and training learns that
answer alone. A row without ``id`` gets one derived from its content (:func:`derive_id`), the
same on every run, recorded as ``metadata.provenance.id_derived``. An answer that came with
the source is ``reference``, never the teacher's. A labelled row adds ``assistant`` (the
teacher's answer) and ``metadata.provenance.labeller``.
"""

from __future__ import annotations

import functools
import hashlib
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
ROLES: tuple[str, ...] = ("user", "assistant")
SCHEMA_PATH = Path(__file__).with_name("row.schema.json")
# Known fields in the order they are written and their errors reported.
FIELDS: tuple[str, ...] = (
    "id",
    "system_hint",
    "history",
    "user",
    "requires_json",
    "json_schema",
    "split",
    "reference",
    "assistant",
    "metadata",
)
# What the id of a row without one is derived from: the prompt, never answers or metadata.
ID_CONTENT: tuple[str, ...] = ("system_hint", "history", "user", "requires_json", "json_schema")
UNSPECIFIED = "unspecified"
SEPARATOR = "\n\n"
# Role names of the plain prompt style, for a conversation's turns.
PLAIN_ROLES = {"user": "User", "assistant": "Assistant"}
JSON_INSTRUCTIONS = (
    "Answer with one JSON object only, no prose and no code fence, "
    "valid against this JSON Schema:\n{schema}"
)


class RecordError(ValueError):
    """A row that cannot be used; ``str()`` is the one-line ``path:line: field: problem``.

    ``line`` is an int for a line of a file; a location such as ``"row 7"`` (a parquet row)
    is written as it is.
    """

    def __init__(
        self, path: str | os.PathLike[str], line: int | str, field_name: str, problem: str
    ):
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
    line: int | str = 0
    history: tuple[dict[str, str], ...] = ()
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to JSONL: known fields first, unknown ones kept as they came.

        ``history`` and ``reference`` are written only when the row has them, so a
        single-turn row reads as it always did.
        """
        row: dict[str, Any] = {"id": self.id, "system_hint": self.system_hint}
        if self.history:
            row["history"] = [dict(turn) for turn in self.history]
        row.update(
            user=self.user,
            requires_json=self.requires_json,
            json_schema=self.json_schema,
            split=self.split,
            metadata=self.metadata,
        )
        if self.reference is not None:
            row["reference"] = self.reference
        if self.assistant is not None:
            row["assistant"] = self.assistant
        row.update(self.extra)
        return row

    @property
    def where(self) -> str:
        """``path:line`` of the row, for messages."""
        return f"{self.source}:{self.line}"

    @property
    def turns(self) -> int:
        """User turns in the conversation, the one the teacher answers included."""
        return len(self.history) // 2 + 1

    @property
    def id_derived(self) -> bool:
        """Whether the id was derived from the content rather than given."""
        return bool((self.metadata.get("provenance") or {}).get("id_derived"))

    def meta(self, name: str) -> str:
        """``metadata[name]`` as a string, ``unspecified`` when the row does not say."""
        value = self.metadata.get(name)
        return str(value) if value not in (None, "") else UNSPECIFIED


# ----------------------------------------------------------------------------- validation


@functools.cache
def row_schema() -> dict[str, Any]:
    """The row format as a JSON Schema (draft 2020-12), read from ``distill/row.schema.json``."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(row_schema())


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


def _field_path(parts: Iterable[Any]) -> str:
    """``metadata.register``, ``history[1].role``: a JSON path as the error line names it."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problem(error: Any) -> tuple[str, str]:
    """``(field, problem)`` of one jsonschema error, in the words the error lines use."""
    path = list(error.absolute_path)
    kind = error.validator
    if "then" in error.schema_path:  # the allOf rule tying json_schema to requires_json
        return "json_schema", "required when requires_json is true"
    if kind == "required":
        missing = next(n for n in error.validator_value if n not in error.instance)
        return _field_path([*path, missing]), "missing required field"
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in known)
        return _field_path([*path, extra]), "unknown field"
    if kind == "type" and not path:
        return "(row)", f"expected a JSON object, got {_json_type(error.instance)}"
    if kind == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted if isinstance(wanted, list) else [wanted])
        return _field_path(path), f"expected {wanted}, got {_json_type(error.instance)}"
    if kind == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return _field_path(path), f"must be one of {allowed}, got {error.instance!r}"
    if kind == "pattern":
        return _field_path(path), "must not be empty"
    return _field_path(path) or "(row)", error.message


def _error_order(error: Any) -> tuple[int, int, str]:
    path = list(error.absolute_path)
    top = path[0] if path else None
    if top is None and error.validator == "required":
        top = next((n for n in error.validator_value if n not in error.instance), None)
    if "then" in error.schema_path:
        top = "json_schema"
    rank = FIELDS.index(top) if top in FIELDS else len(FIELDS)
    return rank, len(path), str(path)


@functools.cache
def _fast_validator() -> Any:
    """jsonschema-rs's compiled validator of the row schema, when installed (else None).

    It says valid or not in about 10 µs a row where the Python validator takes hundreds; the
    Python one still words every error, so messages do not depend on it.
    """
    try:
        import jsonschema_rs
    except ImportError:
        return None
    return jsonschema_rs.validator_for(row_schema())


def schema_errors(row: Any) -> list[tuple[str, str]]:
    """Every ``(field, problem)`` of a decoded row against the row schema, first field first."""
    fast = _fast_validator()
    if fast is not None and fast.is_valid(row):
        return []
    errors = sorted(_validator().iter_errors(row), key=_error_order)
    return [_schema_problem(e) for e in errors]


@functools.lru_cache(maxsize=4096)
def _json_schema_problem(text: str) -> str | None:
    """Why a row's ``json_schema`` (as canonical JSON) is not a valid schema; rows share them."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(json.loads(text))
    except SchemaError as err:
        return f"invalid JSON Schema: {err.message}"
    return None


def derive_id(row: Mapping[str, Any]) -> str:
    """``row-`` + 16 hex digits of a sha256 over the row's prompt: the same on every run.

    Only the prompt counts (system hint, history, user text, JSON schema), with defaults filled
    in, so a row keeps its id once labelled and whether or not it spells its defaults out.
    """
    content = {
        "system_hint": row.get("system_hint") or "",
        "history": list(row.get("history") or []),
        "user": row["user"],
        "requires_json": bool(row.get("requires_json", False)),
        "json_schema": row.get("json_schema"),
    }
    text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "row-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_from_dict(
    row: Any,
    *,
    path: str | os.PathLike[str] = "<row>",
    line: int | str = 0,
    require_answer: bool = False,
) -> Record:
    """Validate one decoded row; return a :class:`Record` (defaults filled) or raise."""

    def fail(name: str, problem: str) -> RecordError:
        return RecordError(path, line, name, problem)

    problems = schema_errors(row)
    if problems:
        raise fail(*problems[0])
    history = tuple(row.get("history") or ())
    for index, turn in enumerate(history):
        expected = ROLES[index % 2]
        if turn["role"] != expected:
            raise fail(
                f"history[{index}].role",
                f"expected {expected}: turns alternate user, assistant, starting with user",
            )
    if len(history) % 2:
        raise fail(
            f"history[{len(history) - 1}]",
            "the last earlier turn must be the assistant's (the row's user text comes next)",
        )
    schema = row.get("json_schema")
    if schema is not None:
        problem = _json_schema_problem(json.dumps(schema, sort_keys=True))
        if problem:
            raise fail("json_schema", problem)
    assistant = row.get("assistant")
    if require_answer and not (assistant or "").strip():
        raise fail("assistant", "missing answer (label this row first)")
    metadata = dict(row.get("metadata") or {})
    record_id = row.get("id")
    if record_id is None:
        record_id = derive_id(row)
        metadata["provenance"] = {**(metadata.get("provenance") or {}), "id_derived": True}
    return Record(
        id=record_id,
        system_hint=row.get("system_hint", ""),
        user=row["user"],
        requires_json=row.get("requires_json", False),
        json_schema=schema,
        metadata=metadata,
        split=row.get("split", "train"),
        assistant=assistant,
        extra={k: v for k, v in row.items() if k not in FIELDS},
        source=str(path),
        line=line,
        history=tuple({"role": t["role"], "content": t["content"]} for t in history),
        reference=row.get("reference"),
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
    return list(iter_records(paths, require_answer=require_answer, allow_empty=allow_empty))


def iter_records(
    paths: Sequence[str | os.PathLike[str]],
    *,
    require_answer: bool = False,
    allow_empty: bool = False,
) -> Iterator[Record]:
    """:func:`read_many` one row at a time: only the ids seen so far stay in memory, as 16-byte
    fingerprints (:class:`distill.idset.IdSet`)."""
    from distill.idset import IdSet, count_lines

    seen = IdSet(expected=count_lines(paths))
    for path in paths:
        if not Path(path).is_file():
            raise RecordError(path, 0, "(file)", "no such file")
        count = 0
        for number, row in iter_json_lines(path):
            record = record_from_dict(row, path=path, line=number, require_answer=require_answer)
            if record.id in seen:
                first = _first_seen(paths, record.id)
                how = " derived from the same prompt" if record.id_derived else ""
                raise RecordError(
                    path, number, "id", f"duplicate id {record.id!r}{how} (first seen at {first})"
                )
            seen.add(record.id)
            count += 1
            yield record
        if count == 0 and not allow_empty:
            raise RecordError(path, 1, "(file)", "empty: no rows")


def _first_seen(paths: Sequence[str | os.PathLike[str]], record_id: str) -> str:
    """``path:line`` of the first row with this id; looked up again on the error path only."""
    for path in paths:
        for number, row in iter_json_lines(path):
            if (row.get("id") if row.get("id") is not None else derive_id(row)) == record_id:
                return f"{path}:{number}"
    return "?"


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
    """Chat messages for the row: an optional system turn, the earlier turns, the user turn."""
    messages = []
    if record.system_hint.strip():
        messages.append({"role": "system", "content": record.system_hint.strip()})
    messages += [{"role": t["role"], "content": t["content"].strip()} for t in record.history]
    messages.append({"role": "user", "content": user_text(record)})
    return messages


def build_prompt(record: Record) -> str:
    """The plain prompt: system hint, user text and JSON instructions joined by blank lines.

    A conversation names each turn (``User: ...``, ``Assistant: ...``) and ends with
    ``Assistant:`` and a newline, where the answer starts.
    """
    if not record.history:
        parts = [record.system_hint.strip(), user_text(record)]
        return SEPARATOR.join(part for part in parts if part) + SEPARATOR
    turns = [f"{PLAIN_ROLES[t['role']]}: {t['content'].strip()}" for t in record.history]
    parts = [
        record.system_hint.strip(),
        *turns,
        f"{PLAIN_ROLES['user']}: {user_text(record)}",
        f"{PLAIN_ROLES['assistant']}:",
    ]
    return SEPARATOR.join(part for part in parts if part) + "\n"


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
