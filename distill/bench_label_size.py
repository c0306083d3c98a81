"""The ``labelling-size`` section of ``make bench``: ``distill label`` on 10k and 100k rows.

    python -m distill.bench --out runs/bench --only labelling-size
    python -m distill.bench --out runs/bench --only labelling-size --size-rows 20000

A synthetic file of short ``{"user": ...}`` rows (ids derived from the content) is labelled by
``distill label --teacher-url`` against llama-server on a tiny llama (``distill.models.
make_tiny_llama``, a few hundred thousand parameters, converted by llama.cpp's own converter;
``--size-teacher embedded``: the embedded SmolLM2-135M GGUF, ~6x slower here), the answers cut to
a few tokens: what is measured is ``distill label`` itself, not the teacher. Each run is
a child process whose peak resident memory comes from the kernel (``wait4``'s ``ru_maxrss``).
Then ``--skip-existing`` runs again over the finished output: every row is skipped, and its
wall time is the resume scan (validate the input, gather the done ids, check the order).

Goal (issue 14): memory stays flat, the 100k-row run's peak RSS within 10% of the 10k-row run's.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distill.bench")
FLAT_GOAL = 0.10  # the large run's peak RSS at most 10% above the small run's
WORDS = ("Salut", "Bonjour", "Allô", "Coudonc", "Pis", "Ben")


@dataclass
class Run:
    """One ``distill label`` child process: wall seconds, peak RSS and its summary."""

    seconds: float
    peak_rss_mib: float
    summary: dict


def write_prompts(path: Path, rows: int) -> Path:
    """A JSONL file of ``rows`` short, distinct ``{"user": ...}`` rows (no ids: derived)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            word = WORDS[i % len(WORDS)]
            handle.write(json.dumps({"user": f"{word}, question {i}: ça va?"}) + "\n")
    return path


def run_measured(command: list[str], log_path: Path) -> tuple[float, float, str]:
    """Run a command to its end: (wall seconds, peak RSS in MiB, its stdout).

    The peak is the kernel's own for that child alone (``wait4``), not a sampled guess.
    Fails with the command's last log line when it exits non-zero.
    """
    started = time.perf_counter()
    peak_file = log_path.with_name(log_path.name + ".maxrss")
    # Through a small Python parent: Linux starts a child's ru_maxrss at its parent's own peak
    # (exec keeps the old mm's high-water mark), so a child of a big process (pytest after the
    # models, the bench) would report the parent's RSS. The wrapper's floor is ~10 MiB.
    wrapped = [sys.executable, "-c", _WRAP, str(peak_file), *command]
    with log_path.open("wb") as err:
        proc = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=err, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{command[0]} exited {proc.returncode}: {lines[-1]}")
    peak_kib = int(peak_file.read_text(encoding="utf-8"))
    return seconds, peak_kib / 1024, proc.stdout.decode("utf-8", errors="replace")


# argv: the file for the child's peak RSS (KiB), then the command; exits with its status.
_WRAP = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w", encoding="utf-8") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def label_once(source: Path, output: Path, url: str, args: list[str]) -> Run:
    """``distill label`` over ``source`` into ``output`` as a child process."""
    command = [
        sys.executable,
        "-m",
        "distill.cli",
        "label",
        "--input",
        str(source),
        "--output",
        str(output),
        "--teacher-url",
        url,
        *args,
    ]
    seconds, rss, out = run_measured(command, output.with_suffix(".log"))
    return Run(seconds, rss, json.loads(out.strip().splitlines()[-1]))


def tiny_teacher(tmp: Path) -> Path:
    """A tiny llama as an f16 GGUF, its tokenizer trained on prompts like the bench's."""
    from distill.export import convert_to_gguf
    from distill.llamacpp import require_tools
    from distill.models import make_tiny_llama

    corpus = [f"{word}, question {i}: ça va? Oui, ben correct."
              for i, word in zip(range(2000), itertools.cycle(WORDS), strict=False)]  # fmt: skip
    model = make_tiny_llama(tmp / "tiny-teacher", corpus)
    gguf = tmp / "tiny-teacher-f16.gguf"
    convert_to_gguf(require_tools(), model, gguf, "f16")
    return gguf


def measure(
    tmp: Path, sizes: tuple[int, int], max_new_tokens: int, parallel: int, teacher: str = "tiny"
) -> dict:
    """Label each size, then resume the largest with ``--skip-existing``; what was measured."""
    from distill.llamacpp import TEACHER_FLAGS, serve
    from distill.models import embedded_teacher_gguf

    flags = [
        "--max-new-tokens",
        str(max_new_tokens),
        "--concurrency",
        str(parallel),
        "--batch-size",
        str(parallel * 4),
        "--no-quality-gate",  # answers cut at a few tokens are what this bench asks for
    ]
    result: dict = {"runs": {}}
    threads = os.cpu_count() or 2
    model = tiny_teacher(tmp) if teacher == "tiny" else embedded_teacher_gguf()
    with serve(model, parallel=parallel, ctx_size=256 * parallel, threads=threads,
               extra=TEACHER_FLAGS) as url:  # fmt: skip
        for rows in sizes:
            source = write_prompts(tmp / f"prompts-{rows}.jsonl", rows)
            log.info("labelling-size: distill label over %d rows", rows)
            result["runs"][rows] = label_once(source, tmp / f"out-{rows}.jsonl", url, flags)
        rows = sizes[-1]
        log.info("labelling-size: distill label --skip-existing over %d finished rows", rows)
        source = tmp / f"prompts-{rows}.jsonl"
        skip = [*flags, "--skip-existing"]
        result["skip"] = label_once(source, tmp / f"out-{rows}.jsonl", url, skip)
    return result
