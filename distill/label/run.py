"""The labelling run: batches, retries, the quality gate, crash-safe appends, the final order."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distill import argspec
from distill.idset import IdSet, count_lines
from distill.label.args import Answer, Generation, LabelArgs, LabelError, Teacher
from distill.label.quality import Gate, problem
from distill.records import (
    Record,
    RecordError,
    append_rows,
    derive_id,
    iter_json_lines,
    iter_records,
    repair_torn_tail,
    write_rows_atomic,
)

log = logging.getLogger(__name__)
# Rows are read, length-sorted and written a window of this many batches at a time: memory
# stays flat however long the input, and a crash loses at most one window's answers.
WINDOW_BATCHES = 8
SHOWN_IDS = 20  # skipped ids kept in the summary and the log; the count covers all


def make_teacher(args: LabelArgs) -> Teacher:
    """The backend the arguments ask for."""
    if args.teacher_url:
        from distill.label.teacher_openai import OpenAITeacher

        return OpenAITeacher(args)
    from distill.label.teacher_hf import TransformersTeacher

    return TransformersTeacher(args)


@dataclass
class Summary:
    """What a labelling run did."""

    total: int = 0
    labelled: int = 0
    skipped: int = 0
    rejected: int = 0
    retried: int = 0
    trimmed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    output: str = ""
    rejects: str = ""
    logprobs: str = ""
    skipped_ids: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    # --teacher-url: per server, requests answered and failed, times taken out.
    servers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second of generation."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For JSON output and the benchmark table."""
        out = {
            "total": self.total,
            "labelled": self.labelled,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.reasons.most_common()),
            "retried": self.retried,
            "trimmed": self.trimmed,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "output": self.output,
            "rejects": self.rejects,
        }
        if self.logprobs:
            out["logprobs"] = self.logprobs
        if self.servers:
            out["servers"] = self.servers
        return out


def reason_kind(reason: str) -> str:
    """The family of a reject reason (``repetition``, ``truncated``, ``invalid JSON``...)."""
    return reason.split(":", 1)[0].strip()


def _done_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows already written to an output or rejects file (after cutting a torn tail), lazily."""
    if not path.exists():
        return
    cut = repair_torn_tail(path)
    if cut:
        log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, cut)
    for number, row in iter_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise RecordError(path, number, "id", "existing output row without a string id")
        yield row


def _done_ids(args: LabelArgs) -> IdSet:
    """Ids already labelled or rejected; only their fingerprints are held, not the rows."""
    from distill.logprobs import repair

    done = IdSet(expected=count_lines([args.output, args.rejects_path]))

    def note(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            done.add(row["id"])
            yield row

    # Blocks appended before a crash cut the rows that would point at them. repair() reads the
    # rows only when there is a logprobs file, so the ids are gathered whether or not it does.
    rows = note(_done_rows(args.output))
    cut = repair(args.logprobs_path, rows)
    for _ in rows:
        pass
    if cut:
        log.warning("%s: cut %d bytes no row points at", args.logprobs_path, cut)
    done.update(row["id"] for row in _done_rows(args.rejects_path))
    return done


def _records(args: LabelArgs) -> Iterator[Record]:
    """The input's rows, validated one at a time, up to ``--limit``."""
    return itertools.islice(iter_records([args.input]), args.limit or None)


def _provenance(
    record: Record, labeller: dict[str, Any], answer: Answer, attempts: int, gen: Generation
) -> dict[str, Any]:
    row = record.to_dict()
    metadata = dict(row["metadata"])
    provenance = dict(metadata.get("provenance") or {})
    provenance["labeller"] = {
        **labeller,
        "generation": gen.as_dict(),
        "attempts": attempts,
        "labelled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if answer.server:  # of several --teacher-url servers, the one that answered
        provenance["labeller"]["server"] = answer.server
    if answer.cut_from is not None:  # cut by --max-new-tokens, kept to its last sentence
        provenance["labeller"]["trimmed"] = {"from_tokens": answer.cut_from, "to": answer.tokens}
    metadata["provenance"] = provenance
    row["metadata"] = metadata
    row["assistant"] = answer.text
    return row


def _windows(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Consecutive runs of ``size`` rows, read lazily."""
    it = iter(records)
    while window := list(itertools.islice(it, size)):
        yield window


def _batches(
    teacher: Teacher, todo: list[Record], args: LabelArgs
) -> list[tuple[list[Record], bool]]:
    """Length-sorted batches of a window, JSON rows apart from free ones: (rows, is_json)."""
    # Longest first: similar lengths share a batch (less padding), and a too-long batch fails
    # at the start of its window. JSON rows batch together: the loop guards that suit prose
    # (repetition penalty, no-repeat n-grams) would fight a grammar that must repeat quotes.
    lengths = teacher.prompt_tokens(todo)
    out = []
    for is_json in (True, False):
        group = sorted(
            (i for i, r in enumerate(todo) if r.requires_json == is_json),
            key=lambda i: -lengths[i],
        )
        for start in range(0, len(group), args.batch_size):
            out.append(([todo[i] for i in group[start : start + args.batch_size]], is_json))
    return out


def label(
    args: LabelArgs,
    teacher: Teacher | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Label every row of ``args.input`` not yet done; return what happened.

    ``teacher`` may be given (tests, benchmarks); otherwise it is built from ``args``.
    ``progress(done, total)`` is called after each batch (the TUI uses it).
    """
    from tqdm import tqdm

    from distill.logprobs import repair

    done = IdSet()
    existing_output = args.output.exists() and args.output.stat().st_size > 0
    if existing_output and not (args.skip_existing or args.overwrite):
        raise LabelError(
            f"{args.output}: already holds rows; --skip-existing resumes, --overwrite replaces"
        )
    if args.overwrite:
        for path in (args.output, args.rejects_path, args.logprobs_path):
            path.unlink(missing_ok=True)
    elif args.skip_existing:
        done = _done_ids(args)
    else:
        # A fresh output: probabilities a deleted output once pointed at are stale.
        repair(args.logprobs_path, [])
    # A first pass validates every row, so a bad row at line 90,000 fails before anything is
    # labelled; the second pass labels. Neither holds more than ids.
    summary = Summary(output=str(args.output), rejects=str(args.rejects_path))
    for record in _records(args):
        summary.total += 1
        if record.id in done:
            summary.skipped += 1
            if len(summary.skipped_ids) < SHOWN_IDS:
                summary.skipped_ids.append(record.id)
    todo_count = summary.total - summary.skipped
    if summary.skipped:
        more = summary.skipped - len(summary.skipped_ids)
        log.info(
            "skipping %d rows already labelled or rejected: %s%s",
            summary.skipped,
            ", ".join(summary.skipped_ids),
            f" and {more} more" if more else "",
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not todo_count:
        log.info("nothing to label: all %d rows are done", summary.total)
        _finish(args, existing_output and not args.overwrite)
        return summary
    teacher = teacher or make_teacher(args)
    labeller = {**teacher.describe(), "prompt_style": teacher.style, "tool": _tool_version()}
    if args.logprobs:
        summary.logprobs = str(args.logprobs_path)
        labeller["logprobs"] = {
            "k": args.logprobs,
            "file": args.logprobs_path.name,
            "distribution": "server top_logprobs"
            if labeller.get("backend") == "openai"
            else "the teacher's own under the grammar, before the loop guards, temperature 1",
        }
    log.info("teacher: %s", labeller)
    gate = Gate(args.quality_gate, args.max_repeat_ratio, args.reject_truncated, args.language)
    bar = tqdm(
        total=todo_count,
        unit="row",
        desc="label",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    started = time.perf_counter()
    todo = (r for r in _records(args) if r.id not in done)
    try:
        for window in _windows(todo, args.batch_size * WINDOW_BATCHES):
            good: dict[str, tuple[dict[str, Any], Any]] = {}
            bad: dict[str, dict[str, Any]] = {}
            for batch, is_json in _batches(teacher, window, args):
                base = Generation(
                    args.max_new_tokens,
                    args.do_sample,
                    args.temperature,
                    args.top_p,
                    args.seed,
                    1.0 if is_json else args.repetition_penalty,
                    0 if is_json else args.no_repeat_ngram_size,
                )
                rows, rejects, blocks = _label_batch(
                    teacher, batch, base, args, labeller, gate, summary
                )
                pairs = zip(rows, blocks, strict=True)
                good.update((row["id"], (row, block)) for row, block in pairs)
                bad.update((row["id"], row) for row in rejects)
                summary.seconds = time.perf_counter() - started
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{summary.tokens_per_second:.1f}", rejected=len(bad))
                if progress:
                    progress(summary.labelled + summary.rejected + len(good) + len(bad), todo_count)
            _append_window(args, window, good, bad)
            summary.labelled += len(good)
            summary.rejected += len(bad)
    finally:
        bar.close()
        server_stats = getattr(teacher, "server_stats", None)  # the OpenAI teacher's pool
        if server_stats:
            summary.servers = server_stats()
            log.info("teacher servers: %s", summary.servers)
    if summary.reasons:
        log.info("rejected by reason: %s", dict(summary.reasons.most_common()))
    _finish(args, existing_output and not args.overwrite)
    return summary


def _append_window(
    args: LabelArgs,
    window: list[Record],
    good: dict[str, tuple[dict[str, Any], Any]],
    bad: dict[str, dict[str, Any]],
) -> None:
    """Append a window's rows in input order: the output needs no sorting at the end."""
    from distill.logprobs import FIELD, append_blocks

    rows = [good[r.id] for r in window if r.id in good]
    # Probabilities first, fsync'd: a row never points at a block that is not on disk.
    refs = iter(append_blocks(args.logprobs_path, [b for _, b in rows if b is not None]))
    for row, block in rows:
        if block is not None:
            row[FIELD] = next(refs)
    append_rows(args.output, [row for row, _ in rows])
    append_rows(args.rejects_path, [bad[r.id] for r in window if r.id in bad])


def _label_batch(
    teacher: Teacher,
    batch: list[Record],
    base: Generation,
    args: LabelArgs,
    labeller: dict[str, Any],
    gate: Gate,
    summary: Summary,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
    """Answer a batch, retrying invalid JSON answers.

    Returns the labelled rows, the reject rows, and the teacher's probabilities of each labelled
    row (None where not recorded), in the order of the labelled rows.
    """
    answers = teacher.answer(batch, base)
    summary.tokens += sum(a.tokens for a in answers)
    results: dict[str, tuple[Answer, int, Generation, str | None]] = {}
    for record, answer in zip(batch, answers, strict=True):
        why = problem(record, answer.text, answer.finished, gate)
        if why and why.startswith("truncated") and args.trim_truncated and answer.trimmed:
            # Its finished sentences stand as the answer, when they pass the gate themselves.
            shorter = problem(record, answer.trimmed.text, answer.trimmed.finished, gate)
            if shorter is None:
                answer, why = answer.trimmed, None
                summary.trimmed += 1
        results[record.id] = (answer, 1, base, why)
    for attempt in range(1, args.json_retries + 1):
        failing = [r for r in batch if results[r.id][3] is not None and r.requires_json]
        if not failing:
            break
        gen = Generation(
            base.max_new_tokens,
            True,
            min(
                args.retry_temperature * 0.5 ** (attempt - 1),
                base.temperature if base.do_sample else args.retry_temperature,
            ),
            base.top_p,
            base.seed + attempt,
            base.repetition_penalty,
            base.no_repeat_ngram_size,
        )
        summary.retried += len(failing)
        retry_answers = teacher.answer(failing, gen)
        summary.tokens += sum(a.tokens for a in retry_answers)
        for record, answer in zip(failing, retry_answers, strict=True):
            why = problem(record, answer.text, answer.finished, gate)
            results[record.id] = (answer, attempt + 1, gen, why)
    good, bad, blocks = [], [], []
    for record in batch:
        answer, attempts, gen, why = results[record.id]
        row = _provenance(record, labeller, answer, attempts, gen)
        if why is None:
            good.append(row)
            blocks.append(answer.logprobs)
        else:
            row.pop("assistant")
            row["reject"] = {"reason": why, "attempts": attempts, "last_answer": answer.text}
            bad.append(row)
            summary.reasons[reason_kind(why)] += 1
    return good, bad, blocks


def _input_ids(args: LabelArgs) -> Iterator[str]:
    """The input's ids in order (rows already validated: no second check)."""
    rows = (row for _, row in iter_json_lines(args.input))
    for row in itertools.islice(rows, args.limit or None):
        yield row["id"] if row.get("id") is not None else derive_id(row)


def _in_input_order(args: LabelArgs) -> bool:
    """Whether the output's ids come in the input's order, read side by side: ids only."""
    ids = _input_ids(args)
    # Each output id is looked for further along the input, never from its start again.
    return all(any(i == row.get("id") for i in ids) for _, row in iter_json_lines(args.output))


def _finish(args: LabelArgs, resumed: bool) -> None:
    """Leave the output in input order, rows from other inputs first (atomic).

    Windows are appended in input order, so only an output this run added to can be out of
    order (rows of another input, a resume after the input changed); that case is sorted in
    memory.
    """
    if not resumed or not args.output.exists() or _in_input_order(args):
        return
    position = {i: n for n, i in enumerate(_input_ids(args))}
    rows = [row for _, row in iter_json_lines(args.output)]
    log.info("%s: putting %d rows back in input order", args.output, len(rows))
    rows.sort(key=lambda row: position.get(row.get("id"), -1))
    write_rows_atomic(args.output, rows)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pidistill {version('pidistill')}"
    except PackageNotFoundError:
        return "pidistill (source)"


def run(args: LabelArgs) -> dict[str, Any]:
    """The ``distill label`` stage: log the final config, label, return the summary."""
    log.info("distill label config: %s", argspec.describe(args))
    summary = label(args)
    return summary.as_dict()
