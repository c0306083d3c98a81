"""``distill import``: prompts from common formats into pidistill rows.

    distill import --input chats.jsonl --output prompts.jsonl         # format from the first row
    distill import --input sharegpt.json --format sharegpt --output prompts.jsonl
    distill import --input alpaca.jsonl --output prompts.jsonl --license cc-by-nc-4.0
    distill import --input data/ --split test --format rows \\
        --map user=question reference=answer --output prompts.jsonl  # a HF dataset on disk

Formats (``--format``; ``auto`` tells them apart by the fields of the first row):

- ``openai``: chat JSONL, ``{"messages": [{"role": "system" | "user" | "assistant",
  "content": "..."}]}``; content may also be a list of ``{"type": "text", "text": ...}`` parts.
- ``sharegpt``: ``{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}]}``.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; the user turn is the
  instruction, then the input after a blank line.
- ``rows``: pidistill rows or any table with a user column (``--map user=question``).

Where the rows come from: a ``.jsonl`` file is read line by line (errors name the line); a
Hugging Face dataset on disk (a ``save_to_disk`` folder, a folder of data files, or a
``.parquet``, ``.arrow`` or ``.json`` file) is read through the ``datasets`` library, ``--split``
picks the split and errors name ``row N`` (0-based, as ``dataset[N]``).

``--map FIELD=NAME`` reads a field under another name: ``messages=dialog``, ``role=speaker``,
``content=text``, ``instruction=prompt``, ``user=question``, ``reference=answer``, ``id=uuid``...

A conversation's earlier turns become the row's ``history``; its last user turn is the ``user``
the teacher answers. An answer that came with the source (a last assistant turn, Alpaca's
``output``) is kept as ``reference``: it is never sent to the teacher and never trained on as
the teacher's. Rows without an id get one derived from their content. Every row written is
validated as every stage validates it; a bad input row stops the import with
``path:line: field: problem`` and nothing written.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import argspec
from distill.argspec import arg
from distill.records import (
    RecordError,
    iter_json_lines,
    record_from_dict,
    write_rows_atomic,
)

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "alpaca", "rows")
# The fields each format reads, under the names ``--map`` can change.
FIELDS: dict[str, tuple[str, ...]] = {
    "openai": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
    "alpaca": ("instruction", "input", "output", "system"),
    "rows": ("user", "system_hint", "history", "reference", "requires_json", "json_schema"),
}
COMMON: tuple[str, ...] = ("id",)
MAPPABLE: tuple[str, ...] = tuple(dict.fromkeys(f for fs in FIELDS.values() for f in fs)) + COMMON
# Speaker names seen in the wild, per role.
ROLE_NAMES: dict[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
HF_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json"}


@dataclass
class ImportArgs:
    """Arguments of ``distill import``."""

    input: Path = arg(
        help="a .jsonl file, or a Hugging Face dataset on disk (folder, .parquet, .arrow, .json)"
    )
    output: Path = arg(help="pidistill JSONL file to write")
    format: str = arg("auto", choices=FORMATS, help="the rows' shape (auto: from the first row)")
    map: list[str] = arg(
        default_factory=list,
        help="FIELD=NAME pairs: read FIELD from the source's NAME (e.g. messages=dialog "
        "user=question reference=answer)",
    )
    split: str = arg("train", help="the split of a Hugging Face dataset to read")
    as_split: str = arg(
        "train", choices=("train", "heldout"), help="the split the imported rows go to"
    )
    source: str = arg("", help="provenance source of every row (default: the input's name)")
    license: str = arg("", help="provenance license of every row, e.g. cc-by-4.0")
    register: str = arg("", help="metadata.register of every row (default: unspecified)")
    dialect: str = arg("", help="metadata.dialect of every row (default: unspecified)")
    drop_duplicates: bool = arg(
        False, help="skip rows whose prompt (hence derived id) repeats, instead of failing"
    )
    overwrite: bool = arg(False, help="replace an existing output file")

    def __post_init__(self) -> None:
        self.input = Path(self.input)
        self.output = Path(self.output)
        if self.output.suffix.lower() != ".jsonl":
            raise ValueError(f"--output must be a .jsonl file, got {self.output}")
        if self.output.resolve() == self.input.resolve():
            raise ValueError("--output must not be the input")
        self.names = parse_map(self.map)


def parse_map(pairs: list[str]) -> dict[str, str]:
    """``["messages=dialog"]`` -> ``{"messages": "dialog"}``; unknown fields fail here."""
    names: dict[str, str] = {}
    for pair in pairs:
        field, sep, name = pair.partition("=")
        field, name = field.strip(), name.strip()
        if not sep or not field or not name:
            raise ValueError(f"--map {pair!r}: expected FIELD=NAME")
        if field not in MAPPABLE:
            raise ValueError(
                f"--map {pair!r}: unknown field {field!r} (known: {', '.join(MAPPABLE)})"
            )
        names[field] = name
    return names


# ----------------------------------------------------------------------------- sources


def is_hf_source(path: Path) -> bool:
    """Whether ``path`` is read through ``datasets`` (a folder or a parquet/arrow/json file)."""
    return path.is_dir() or path.suffix.lower() in HF_SUFFIXES


def read_source(path: Path, split: str) -> Iterator[tuple[int | str, Any]]:
    """``(location, row)`` of every input row: a line number, or ``row N`` of a dataset."""
    if not path.exists():
        raise RecordError(path, 0, "(file)", "no such file or folder")
    if not is_hf_source(path):
        yield from iter_json_lines(path)
        return
    # A cache of our own, dropped afterwards: datasets keys a folder whose README names its
    # files by those patterns, not by the files' content, and would serve an earlier import.
    with tempfile.TemporaryDirectory(prefix="pidistill-import-") as cache:
        dataset = load_hf(path, split, Path(cache))
        for index, row in enumerate(dataset):
            yield f"row {index}", row


def load_hf(path: Path, split: str, cache_dir: Path | None = None) -> Any:
    """One split of a Hugging Face dataset on disk, through the ``datasets`` library."""
    import datasets

    datasets.disable_progress_bars()
    cache = {"cache_dir": str(cache_dir)} if cache_dir else {}
    if path.is_dir() and any((path / n).exists() for n in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path), **cache)
    else:
        builder = HF_SUFFIXES[path.suffix.lower()]
        loaded = datasets.load_dataset(builder, data_files={split: str(path)}, **cache)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"{path}: --split {split}: no such split (splits: {', '.join(loaded)})"
            )
        return loaded[split]
    return loaded


# ----------------------------------------------------------------------------- conversion


@dataclass
class Converter:
    """Turns one source row into a pidistill row dict, naming the source's own fields in errors."""

    format: str
    names: dict[str, str]

    def name(self, field: str) -> str:
        """The source's name for ``field``."""
        return self.names.get(field, field)

    def convert(self, row: Any, fail: Any) -> dict[str, Any]:
        """The pidistill row (no id yet unless the source has one)."""
        if not isinstance(row, dict):
            raise fail("(row)", "expected a JSON object")
        out = getattr(self, f"_{self.format}")(row, fail)
        if row.get(self.name("id")) is not None:
            value = row[self.name("id")]
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise fail(self.name("id"), "expected string or integer")
            out["id"] = str(value)
        return out

    def _text(self, row: dict[str, Any], field: str, fail: Any, required: bool = True) -> str:
        name = self.name(field)
        value = row.get(name)
        if value is None:
            if required:
                raise fail(name, "missing required field")
            return ""
        if not isinstance(value, str):
            raise fail(name, f"expected string, got {type(value).__name__}")
        return value

    def _openai(self, row: dict[str, Any], fail: Any) -> dict[str, Any]:
        return self._conversation(row, fail, "messages", "role", "content")

    def _sharegpt(self, row: dict[str, Any], fail: Any) -> dict[str, Any]:
        return self._conversation(row, fail, "conversations", "from", "value")

    def _conversation(
        self, row: dict[str, Any], fail: Any, list_field: str, role_field: str, text_field: str
    ) -> dict[str, Any]:
        turns_name, role_name, text_name = map(self.name, (list_field, role_field, text_field))
        turns = row.get(turns_name)
        if turns is None:
            raise fail(turns_name, "missing required field")
        if not isinstance(turns, list) or not turns:
            raise fail(turns_name, "expected a non-empty list of turns")
        system: list[str] = []
        said: list[tuple[str, str]] = []
        for index, turn in enumerate(turns):
            where = f"{turns_name}[{index}]"
            if not isinstance(turn, dict):
                raise fail(where, "expected an object")
            speaker = turn.get(role_name)
            role = ROLE_NAMES.get(str(speaker).lower()) if isinstance(speaker, str) else None
            if role is None:
                raise fail(f"{where}.{role_name}", f"unsupported role {speaker!r}")
            text = _content(turn.get(text_name))
            if text is None:
                raise fail(f"{where}.{text_name}", "expected a string or a list of text parts")
            if role == "system":
                if said:
                    raise fail(f"{where}.{role_name}", "a system turn after the conversation began")
                system.append(text)
                continue
            expected = "user" if len(said) % 2 == 0 else "assistant"
            if role != expected:
                raise fail(
                    f"{where}.{role_name}",
                    f"expected {expected}: turns alternate user, assistant, starting with user",
                )
            if not text.strip():
                raise fail(f"{where}.{text_name}", "must not be empty")
            said.append((role, text))
        if not said:
            raise fail(turns_name, "no user turn")
        reference = None
        if said[-1][0] == "assistant":  # the source's own answer: a reference, not the teacher's
            reference = said.pop()[1]
        out: dict[str, Any] = {"system_hint": "\n\n".join(s.strip() for s in system if s.strip())}
        if len(said) > 1:
            out["history"] = [{"role": r, "content": t} for r, t in said[:-1]]
        out["user"] = said[-1][1]
        if reference is not None:
            out["reference"] = reference
        return out

    def _alpaca(self, row: dict[str, Any], fail: Any) -> dict[str, Any]:
        instruction = self._text(row, "instruction", fail)
        extra = self._text(row, "input", fail, required=False)
        if not instruction.strip():
            raise fail(self.name("instruction"), "must not be empty")
        user = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        out: dict[str, Any] = {
            "system_hint": self._text(row, "system", fail, required=False).strip(),
            "user": user,
        }
        output = self._text(row, "output", fail, required=False)
        if output.strip():
            out["reference"] = output
        return out

    def _rows(self, row: dict[str, Any], fail: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in FIELDS["rows"]:
            name = self.name(field)
            if row.get(name) is not None:
                out[field] = row[name]
        if "user" not in out:
            raise fail(self.name("user"), "missing required field")
        # A pidistill row's own answer came with the source: a reference, never the teacher's.
        if "reference" not in out and isinstance(row.get("assistant"), str):
            out["reference"] = row["assistant"]
        for field in ("split", "metadata"):
            if field in row:
                out[field] = row[field]
        return out


def _content(value: Any) -> str | None:
    """A turn's text: a string, or the text parts of an OpenAI content list joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "\n".join(p["text"] for p in value)
    return None


def guess_format(row: Any, names: dict[str, str]) -> str | None:
    """The format whose main field the row has, or None."""
    if not isinstance(row, dict):
        return None
    for fmt, field in (
        ("openai", "messages"),
        ("sharegpt", "conversations"),
        ("alpaca", "instruction"),
        ("rows", "user"),
    ):
        if names.get(field, field) in row:
            return fmt
    return None


# ----------------------------------------------------------------------------- the stage


def import_rows(args: ImportArgs) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every input row as a validated pidistill row, and what the import did."""
    source = args.source or args.input.name
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    dropped = 0
    converter: Converter | None = None
    for where, raw in read_source(args.input, args.split):

        def fail(field: str, problem: str, where: int | str = where) -> RecordError:
            return RecordError(args.input, where, field, problem)

        if converter is None:
            fmt = args.format
            if fmt == "auto":
                fmt = guess_format(raw, args.names) or ""
                if not fmt:
                    keys = ", ".join(sorted(raw)) if isinstance(raw, dict) else type(raw).__name__
                    raise fail(
                        "(format)",
                        f"cannot tell the format from the fields {keys}; pass --format or --map",
                    )
                log.info("%s: %s format", args.input, fmt)
            converter = Converter(fmt, args.names)
        row = converter.convert(raw, fail)
        row.setdefault("split", args.as_split)
        metadata = dict(row.get("metadata") or {})
        for key in ("register", "dialect"):
            if getattr(args, key):
                metadata[key] = getattr(args, key)
        provenance = dict(metadata.get("provenance") or {})
        provenance.update(source=source, format=converter.format)
        provenance["imported_from"] = f"{args.input}:{where}"
        if args.license:
            provenance["license"] = args.license
        metadata["provenance"] = provenance
        row["metadata"] = metadata
        record = record_from_dict(row, path=args.input, line=where)
        if record.id in seen:
            if args.drop_duplicates:
                dropped += 1
                continue
            raise fail("id", f"duplicate id {record.id!r} (first seen at {seen[record.id]})")
        seen[record.id] = f"{args.input}:{where}"
        rows.append(record.to_dict())
    if not rows:
        raise RecordError(args.input, 1, "(file)", "empty: no rows")
    summary = {
        "rows": len(rows),
        "format": converter.format if converter else args.format,
        "conversations": sum(bool(r.get("history")) for r in rows),
        "with_reference": sum("reference" in r for r in rows),
        "dropped_duplicates": dropped,
        "output": str(args.output),
    }
    return rows, summary


def run(args: ImportArgs) -> dict[str, Any]:
    """The ``distill import`` stage: read and check every row, then write them in one step."""
    log.info("distill import config: %s", argspec.describe(args))
    if args.output.exists() and args.output.stat().st_size and not args.overwrite:
        raise ValueError(f"{args.output}: already exists; --overwrite replaces it")
    rows, summary = import_rows(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_rows_atomic(args.output, rows)
    return summary
