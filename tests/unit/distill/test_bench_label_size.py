"""The labelling-size bench's pieces without a model, and distill label's flat memory."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest

from distill import label as label_stage
from distill.bench_label_size import run_measured, write_prompts
from distill.label import Answer, Generation, LabelArgs
from distill.label.run import SHOWN_IDS
from distill.records import Record, iter_json_lines, read_records


class EchoTeacher:
    """Answers every row at once with a short sentence: only distill label itself is measured."""

    style = "plain"

    def answer(self, records: list[Record], gen: Generation) -> list[Answer]:
        return [Answer("Ben oui, ça va.", 5) for _ in records]

    def prompt_tokens(self, records: list[Record]) -> list[int]:
        return [len(r.user) for r in records]

    def describe(self) -> dict:
        return {"backend": "echo", "model": "echo", "revision": None}


def test_the_synthetic_prompts_are_distinct_user_only_rows(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.jsonl", 50)
    records = read_records(path)  # derived ids: a duplicate prompt would fail here
    assert len(records) == 50
    assert all(r.id_derived and r.user for r in records)


def test_run_measured_reports_the_childs_own_peak_memory(tmp_path: Path) -> None:
    grow = "b = bytearray(256 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('done')"
    seconds, rss, out = run_measured([sys.executable, "-c", grow], tmp_path / "big.log")
    assert out.strip() == "done" and seconds > 0
    assert rss >= 256
    _, small, _ = run_measured([sys.executable, "-c", "print(1)"], tmp_path / "small.log")
    assert small < rss - 150  # its own peak, not the largest child's so far


def test_a_child_of_a_big_parent_reports_its_own_peak_not_the_parents(tmp_path: Path) -> None:
    # Linux starts a child's ru_maxrss at its parent's high-water mark; pytest is big by now.
    ballast = bytearray(400 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    _, small, _ = run_measured([sys.executable, "-c", "print(1)"], tmp_path / "small.log")
    assert small < 100, small
    del ballast


def test_run_measured_fails_with_the_last_line_of_the_log(tmp_path: Path) -> None:
    fail = "import sys; print('first', file=sys.stderr); sys.exit('the reason')"
    with pytest.raises(RuntimeError, match="exited 1: the reason"):
        run_measured([sys.executable, "-c", fail], tmp_path / "fail.log")


def _peak_bytes(tmp_path: Path, rows: int) -> int:
    source = write_prompts(tmp_path / f"in-{rows}.jsonl", rows)
    args = LabelArgs(input=source, output=tmp_path / f"out-{rows}.jsonl", batch_size=16)
    tracemalloc.start()
    try:
        summary = label_stage.label(args, teacher=EchoTeacher())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.labelled == rows
    return peak


def test_label_streams_its_input_memory_stays_flat(tmp_path: Path) -> None:
    # Holding every row (input records or output rows) costs over 1 kB a row; streaming holds a
    # window of rows and the ids (under 100 bytes a row).
    small, large = _peak_bytes(tmp_path, 1_000), _peak_bytes(tmp_path, 10_000)
    assert large - small < 9_000 * 300, f"{small=} {large=}"
    output = [row["id"] for _, row in iter_json_lines(tmp_path / "out-10000.jsonl")]
    assert output == [r.id for r in read_records(tmp_path / "in-10000.jsonl")]


def test_skip_existing_over_a_finished_output_rewrites_nothing(tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 300)
    args = LabelArgs(input=source, output=tmp_path / "out.jsonl", batch_size=16)
    label_stage.label(args, teacher=EchoTeacher())
    before = args.output.stat().st_mtime_ns
    resumed = LabelArgs(input=source, output=args.output, skip_existing=True)
    summary = label_stage.label(resumed, teacher=EchoTeacher())
    assert (summary.skipped, summary.labelled) == (300, 0)
    assert len(summary.skipped_ids) == SHOWN_IDS
    assert args.output.stat().st_mtime_ns == before
