"""kill -9 during ``distill label``, again and again: a resumed run loses and duplicates nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.records import iter_json_lines

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
ROWS = 240


def write_prompts(path: Path) -> list[str]:
    ids = []
    with path.open("w", encoding="utf-8") as handle:
        for i in range(ROWS):
            needs_json = i % 5 == 0
            row = {
                "id": f"k{i:03d}",
                "system_hint": "Réponds en québécois.",
                "user": "Raconte-moi ta fin de semaine. " * (i % 6 + 1),
                "requires_json": needs_json,
                "json_schema": SCHEMA if needs_json else None,
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "crash-test"},
                },
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            ids.append(row["id"])
    return ids


def command(source: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill.cli",
        "-q",
        "label",
        "--input",
        str(source),
        "--output",
        str(output),
        "--teacher",
        str(model),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--json-retries",
        "1",
        "--no-quality-gate",  # a random model's six tokens are no sentence: keep them
        "--logprobs",
        "3",
        *extra,
    ]


def lines_of(path: Path) -> list[dict]:
    return [row for _, row in iter_json_lines(path)] if path.exists() else []


@pytest.mark.slow
def test_resume_after_repeated_kill_9_gives_every_id_exactly_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    source = tmp_path / "prompts.jsonl"
    ids = write_prompts(source)
    output = tmp_path / "out.jsonl"
    rejects = tmp_path / "out.rejects.jsonl"
    rng = random.Random(7)
    kills = 0
    for _ in range(6):
        before = output.stat().st_size if output.exists() else 0
        proc = subprocess.Popen(
            command(source, output, tiny_model, "--skip-existing"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait until this run has appended something, then kill it a random moment later.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if output.exists() and output.stat().st_size > before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.15))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3, "the runs finished before they could be killed: make the job longer"
    final = subprocess.run(
        command(source, output, tiny_model, "--skip-existing"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert final.returncode == 0, final.stderr
    done = [row["id"] for row in lines_of(output)] + [row["id"] for row in lines_of(rejects)]
    assert sorted(done) == ids  # every input id exactly once, across output and rejects
    rejected = {row["id"] for row in lines_of(rejects)}
    assert [row["id"] for row in lines_of(output)] == [i for i in ids if i not in rejected]
    for path in (output, rejects):
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        for line in raw.decode("utf-8").splitlines():
            json.loads(line)

    # Every labelled row has its probabilities, and no probabilities are left without a row.
    from distill.logprobs import FIELD, read_block, sidecar_path

    blocks = [read_block(output, row[FIELD]) for row in lines_of(output)]
    assert [b.tokens for b in blocks] == [row[FIELD]["tokens"] for row in lines_of(output)]
    ends = [
        row[FIELD]["offset"] + 16 + 4 * b.tokens + 6 * b.tokens * b.k
        for row, b in zip(lines_of(output), blocks, strict=True)
    ]
    assert sidecar_path(output).stat().st_size == max(ends)

    # The same rows as an uninterrupted run.
    clean = tmp_path / "clean.jsonl"
    subprocess.run(command(source, clean, tiny_model), check=True, capture_output=True)
    clean_ids = sorted(row["id"] for row in lines_of(clean))
    assert sorted(row["id"] for row in lines_of(output)) == clean_ids
