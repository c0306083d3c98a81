"""What a GGUF's header says about the model, read with the standard library: its architecture
and embedding size, enough to tell an encoder (embeddings) from a decoder (completions).

The header is a list of key-value pairs read in order until the keys wanted are found; the
tokenizer's arrays that may come before them are skipped, not kept. A file that is not a GGUF
of version 2 or 3, or whose header does not parse, tells nothing (``Header()``): the store
accepts it and the switch's probe decides (llama-server is the judge of what loads).

    general.architecture = "bert"          -> an encoder (BERT-style: MiniLM and kin)
    bert.embedding_length = 384            -> the size of the vectors it returns
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pi_agent.store import StoreError

# llama.cpp's embedding-only architectures (src/llama-arch.cpp at 0c1e570): llama-server serves
# them with --embedding; every other architecture generates text.
ENCODER_ARCHITECTURES = frozenset({
    "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
    "jina-bert-v3", "eurobert", "t5encoder", "gemma-embedding",
})  # fmt: skip
MAX_KEYS = 1 << 16  # a header claiming more is not one this reader trusts
MAX_STRING = 1 << 20  # bytes in one key or string value
# GGUF value types: their struct formats (strings and arrays are read apart).
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Unreadable(Exception):
    """The header does not parse (truncated, absurd sizes, unknown types)."""


@dataclass(frozen=True)
class Header:
    """What the header told: ``architecture`` ("" when unknown) and ``embedding_length``."""

    architecture: str = ""
    embedding_length: int | None = None

    @property
    def kind(self) -> str | None:
        """``encoder``, ``decoder``, or ``None`` when the header did not say."""
        if not self.architecture:
            return None
        return "encoder" if self.architecture in ENCODER_ARCHITECTURES else "decoder"


def read_header(path: Path) -> Header:
    """The architecture and embedding size of the GGUF at ``path`` (``Header()`` when the file
    does not tell: not a GGUF, another version, a header that does not parse)."""
    try:
        with Path(path).open("rb") as handle:
            return _read(handle)
    except (OSError, _Unreadable, struct.error, UnicodeDecodeError):
        return Header()


def _take(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _Unreadable("truncated")
    return data


def _unpack(handle: BinaryIO, fmt: str) -> int | float | bool:
    return struct.unpack("<" + fmt, _take(handle, struct.calcsize(fmt)))[0]


def _string(handle: BinaryIO) -> str:
    size = int(_unpack(handle, "Q"))
    if size > MAX_STRING:
        raise _Unreadable("string too long")
    return _take(handle, size).decode("utf-8")


def _skip(handle: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        size = int(_unpack(handle, "Q"))
        if size > MAX_STRING:
            raise _Unreadable("string too long")
        handle.seek(size, 1)
    elif kind == _ARRAY:
        item, count = int(_unpack(handle, "I")), int(_unpack(handle, "Q"))
        if item in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == _STRING:
            for _ in range(count):
                _skip(handle, _STRING)
        else:  # arrays of arrays: llama.cpp writes none
            raise _Unreadable(f"array of type {item}")
    elif kind in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[kind]), 1)
    else:
        raise _Unreadable(f"value type {kind}")


def _read(handle: BinaryIO) -> Header:
    if handle.read(4) != b"GGUF" or _unpack(handle, "I") not in (2, 3):
        return Header()
    _unpack(handle, "Q")  # the tensor count
    keys = int(_unpack(handle, "Q"))
    if keys > MAX_KEYS:
        raise _Unreadable("too many keys")
    architecture, length = "", None
    for _ in range(keys):
        key, kind = _string(handle), int(_unpack(handle, "I"))
        if key == "general.architecture" and kind == _STRING:
            architecture = _string(handle)
        elif architecture and key == f"{architecture}.embedding_length" and kind in _SCALARS:
            length = int(_unpack(handle, _SCALARS[kind]))
        else:
            _skip(handle, kind)
        if architecture and length is not None:
            break
    return Header(architecture, length)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def expect_kind(kind: str, other_route: str) -> Callable[[Path], None]:
    """A store's ``inspect`` check: refuse (422) a GGUF whose header says it is not a ``kind``
    model, naming the route that takes it."""

    def inspect(path: Path) -> None:
        header = read_header(path)
        if header.kind is not None and header.kind != kind:
            raise StoreError(
                f"this GGUF is a {header.architecture} model, {_a(header.kind)}, not "
                f"{_a(kind)}: install it with {other_route}",
                422,
            )

    return inspect
