"""The teacher's targets for ``--loss kd|mix``: which rows have them, the vocabulary, encoding.

A row labelled with ``--logprobs`` points at its block in the sidecar file
(:mod:`distill.logprobs`): the tokens the teacher generated and its top K candidates at each. The
training sequence of such a row takes exactly those tokens as its answer (not a re-tokenization
of the text), so answer position ``i`` is where the teacher's distribution ``i`` applies; that only
means something when the student reads ids as the teacher did, hence the vocabulary check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distill import logprobs
from distill.encoding import (
    IGNORE_INDEX,
    Example,
    encode_all,
    encode_record,
    encode_record_with_ids,
)
from distill.records import Record
from distill.train.args import TrainError


@dataclass
class TeacherTargets:
    """The teacher's top-K candidates for the answer tokens of one training sequence."""

    start: int  # index in input_ids of the first answer token
    top_ids: Any  # numpy int32 [T, K], T answer tokens kept (after truncation)
    top_logprobs: Any  # numpy float32 [T, K]


@dataclass
class TrainExample(Example):
    """An :class:`Example` with the teacher's targets when its row has them."""

    teacher: TeacherTargets | None = field(default=None)


@dataclass
class TeacherRows:
    """What the rows say about the teacher: its vocabulary and which rows lack targets."""

    vocab_hash: str | None
    with_targets: int
    without: list[Record]


def _listing(records: Sequence[Record], limit: int = 10) -> str:
    shown = ", ".join(f"{r.where} ({r.id})" for r in records[:limit])
    return shown + (f" and {len(records) - limit} more" if len(records) > limit else "")


def check_rows(records: Sequence[Record], loss: str) -> TeacherRows:
    """Rows with and without ``teacher_logprobs``, and the one teacher vocabulary they record.

    ``kd`` needs targets on every row; ``mix`` on at least one (the others train on
    cross-entropy alone). Every row with targets must record the teacher's ``vocab_hash``
    (``metadata.provenance.labeller.vocab_hash``), and all the same one.
    """
    has = [r for r in records if (r.extra or {}).get(logprobs.FIELD) is not None]
    without = [r for r in records if (r.extra or {}).get(logprobs.FIELD) is None]
    if loss == "kd" and without:
        raise TrainError(
            f"--loss kd: {len(without)} row(s) have no teacher_logprobs (label them with "
            f"--logprobs, or train with --loss mix or sft): {_listing(without)}"
        )
    if not has:
        raise TrainError(
            f"--loss {loss}: no row has teacher_logprobs (label with --logprobs, or --loss sft)"
        )
    hashes: dict[str, list[Record]] = {}
    unrecorded = []
    for record in has:
        labeller = (record.metadata.get("provenance") or {}).get("labeller") or {}
        value = labeller.get("vocab_hash")
        if value:
            hashes.setdefault(value, []).append(record)
        else:
            unrecorded.append(record)
    if unrecorded:
        raise TrainError(
            f"--loss {loss}: {len(unrecorded)} row(s) have teacher_logprobs but no "
            f"metadata.provenance.labeller.vocab_hash to check the vocabulary against: "
            f"{_listing(unrecorded)}"
        )
    if len(hashes) > 1:
        seen = "; ".join(f"{h} ({_listing(rows, 3)})" for h, rows in hashes.items())
        raise TrainError(f"--loss {loss}: rows come from teachers of other vocabularies: {seen}")
    return TeacherRows(next(iter(hashes)), len(has), without)


def check_vocabulary(teacher_hash: str | None, tokenizer: Any, base: str) -> str:
    """The student's vocabulary hash, which must equal the teacher's; else a TrainError."""
    student = logprobs.vocab_hash(tokenizer)
    if student != teacher_hash:
        raise TrainError(
            f"the student's vocabulary ({base}: {student}) is not the teacher's ({teacher_hash}): "
            "its top-K ids name other tokens; pick a student with the teacher's tokenizer, or "
            "train with --loss sft, which needs only the answers' text"
        )
    return student


def encode_rows(
    records: Sequence[Record], tokenizer: Any, requested_style: str, max_length: int
) -> tuple[list[Example], dict[str, Any]]:
    """Like :func:`distill.encoding.encode_all`, rows with targets encoded on the teacher's ids.

    The counts add ``teacher_target_tokens`` (answer tokens with a teacher distribution) and
    ``teacher_target_share`` (their share of all answer tokens).
    """
    examples, stats = encode_all(records, tokenizer, requested_style, max_length, _encode)
    with_targets = sum(
        e.teacher.top_ids.shape[0]
        for e in examples
        if isinstance(e, TrainExample) and e.teacher is not None
    )
    answer_tokens = stats["answer_tokens"]
    stats["teacher_target_tokens"] = with_targets
    stats["teacher_target_share"] = (
        round(with_targets / answer_tokens, 4) if answer_tokens else None
    )
    return examples, stats


def _encode(record: Record, style: str, tokenizer: Any, max_length: int) -> Example | None:
    """One row: on the teacher's ids with its targets when it has them, else as text."""
    block = logprobs.read_for(record)
    if block is None:
        return encode_record(record, style, tokenizer, max_length)
    if block.tokens == 0 or block.k == 0:
        raise TrainError(f"{record.where}: teacher_logprobs hold no tokens or no candidates")
    example = encode_record_with_ids(record, style, tokenizer, block.token_ids, max_length)
    if example is None:
        return None
    answer = sum(1 for x in example.labels if x != IGNORE_INDEX)
    return TrainExample(
        id=example.id,
        input_ids=example.input_ids,
        labels=example.labels,
        truncated=example.truncated,
        teacher=TeacherTargets(
            len(example.input_ids) - answer, block.top_ids[:answer], block.top_logprobs[:answer]
        ),
    )


def largest_id(examples: Sequence[Example]) -> int:
    """The largest candidate id in the teacher's targets (-1 without any)."""
    return max(
        (
            int(e.teacher.top_ids.max())
            for e in examples
            if isinstance(e, TrainExample) and e.teacher is not None
        ),
        default=-1,
    )


def max_k(examples: Sequence[Example]) -> int:
    """The most candidates a position among the examples' targets (0 without any)."""
    return max(
        (
            int(e.teacher.top_ids.shape[1])
            for e in examples
            if isinstance(e, TrainExample) and e.teacher is not None
        ),
        default=0,
    )
