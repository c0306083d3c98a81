"""The teacher's top-K log-probabilities, stored compactly beside a labelled JSONL file.

    distill label --input prompts.jsonl --output out.jsonl --logprobs 20
    # out.jsonl         rows, each with "teacher_logprobs": {file, offset, tokens, k, crc32}
    # out.logprobs.bin  a block per row: the answer's token ids, top-K ids and log-probabilities

A block is a 16-byte header (``PDLP``, format version, token count T, K) followed by the answer's
T token ids (int32: exactly the tokens the teacher generated, end-of-sequence included when it
ended the answer), the top-K ids at each position (int32, T x K) and their log-probabilities
(float16, T x K, natural log, sorted best first). Mass outside the top K is ``1 - sum(exp)``.

Crash safety, together with the rows: a batch's blocks are appended and fsync'd *before* its rows
are appended to the JSONL, so a row never points at probabilities that are not on disk. A crash
between the two leaves blocks that no row points at; the next run cuts the file back to the end
of the last block a row points at (:func:`repair`), and the rows it redoes append new blocks.
A block's CRC-32 in the row catches a file that was swapped or damaged since.

Which distribution: the teacher's own at temperature 1, under the JSON grammar, before the loop
guards (repetition penalty, no-repeat n-gram) that steered which token was picked, so the picked
token need not be its best (:mod:`distill.label.teacher_hf`). For a ``requires_json`` row
that is the teacher's distribution renormalised over what the grammar allows, so a student
learning it learns to stay inside the schema; tokens the grammar forbids have no mass. The
OpenAI-compatible backend records what the server returns (llama-server's ``top_logprobs`` are
taken before its grammar), and each row's provenance says which (``logprobs.distribution``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"PDLP"
VERSION = 1
HEADER = struct.Struct("<4sBxxxII")  # magic, version, pad, tokens, k
FIELD = "teacher_logprobs"
SUFFIX = ".logprobs.bin"


class LogprobsError(ValueError):
    """A logprobs file or reference that cannot be used; the message names the file."""


@dataclass
class TokenLogprobs:
    """The teacher's view of one answer: its tokens and the top K candidates at each of them."""

    token_ids: Any  # numpy int32 [T]
    top_ids: Any  # numpy int32 [T, K]
    top_logprobs: Any  # numpy float32 [T, K], natural log, best first

    @property
    def tokens(self) -> int:
        """Answer length in tokens."""
        return int(self.token_ids.shape[0])

    @property
    def k(self) -> int:
        """Candidates kept per position."""
        return int(self.top_ids.shape[1]) if self.top_ids.ndim == 2 else 0

    def encode(self) -> bytes:
        """The block as written to disk."""
        import numpy as np

        ids = np.ascontiguousarray(self.token_ids, dtype="<i4")
        top = np.ascontiguousarray(self.top_ids, dtype="<i4").reshape(self.tokens, self.k)
        lp = np.ascontiguousarray(self.top_logprobs, dtype="<f2").reshape(self.tokens, self.k)
        return HEADER.pack(MAGIC, VERSION, self.tokens, self.k) + (
            ids.tobytes() + top.tobytes() + lp.tobytes()
        )


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """``out.jsonl`` -> ``out.logprobs.bin`` (same folder)."""
    path = Path(output)
    return path.with_name(path.stem + SUFFIX)


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted): equal hashes, same ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def append_blocks(path: Path, blocks: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    """Append blocks in one write, fsync; return the reference each row stores, in order."""
    if not blocks:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = [b.encode() for b in blocks]
    with path.open("ab") as handle:
        offset = handle.seek(0, os.SEEK_END)
        handle.write(b"".join(encoded))
        handle.flush()
        os.fsync(handle.fileno())
    refs = []
    for block, data in zip(blocks, encoded, strict=True):
        refs.append(
            {
                "file": path.name,
                "offset": offset,
                "tokens": block.tokens,
                "k": block.k,
                "crc32": zlib.crc32(data),
            }
        )
        offset += len(data)
    return refs


def _block_size(tokens: int, k: int) -> int:
    return HEADER.size + 4 * tokens + 6 * tokens * k


def repair(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Cut blocks that no row points at (a crash between the two appends); return bytes cut."""
    if not path.exists():
        return 0
    end = 0
    for row in rows:
        ref = row.get(FIELD)
        if isinstance(ref, dict) and ref.get("file") == path.name:
            end = max(end, int(ref["offset"]) + _block_size(int(ref["tokens"]), int(ref["k"])))
    size = path.stat().st_size
    if size < end:
        raise LogprobsError(f"{path}: {size} bytes, but rows point up to byte {end}")
    if size > end:
        with path.open("r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return size - end


def read_block(jsonl: str | os.PathLike[str], ref: Mapping[str, Any]) -> TokenLogprobs:
    """The block a row of ``jsonl`` points at, checked against its CRC-32."""
    import numpy as np

    try:
        name, offset, tokens, k = ref["file"], int(ref["offset"]), int(ref["tokens"]), int(ref["k"])
    except (KeyError, TypeError, ValueError):
        raise LogprobsError(f"{jsonl}: {FIELD}: malformed reference {dict(ref)!r}") from None
    path = Path(jsonl).parent / name
    size = _block_size(tokens, k)
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
    except FileNotFoundError:
        raise LogprobsError(f"{path}: missing (its rows in {jsonl} point at it)") from None
    if len(data) != size or zlib.crc32(data) != ref.get("crc32"):
        raise LogprobsError(f"{path}: block at byte {offset} is damaged or does not match its row")
    magic, version, t, kk = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or (t, kk) != (tokens, k):
        raise LogprobsError(f"{path}: byte {offset} is not a version-{VERSION} logprobs block")
    body = memoryview(data)[HEADER.size :]
    ids = np.frombuffer(body[: 4 * t], dtype="<i4").copy()
    top = np.frombuffer(body[4 * t : 4 * t + 4 * t * k], dtype="<i4").reshape(t, k).copy()
    lp = np.frombuffer(body[4 * t + 4 * t * k :], dtype="<f2").reshape(t, k).astype(np.float32)
    return TokenLogprobs(ids, top, lp)


def read_for(record: Any) -> TokenLogprobs | None:
    """The teacher's probabilities of a labelled :class:`distill.records.Record`, if recorded."""
    ref = (record.extra or {}).get(FIELD)
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise LogprobsError(f"{record.where}: {FIELD}: expected an object")
    return read_block(record.source, ref)
