"""`distill label --teacher-url A,B`: two real llama-servers share the rows; one is killed
(SIGKILL) while it holds requests, and every row still ends in the output exactly once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distill import label as label_stage
from distill.label import LabelArgs, OpenAITeacher
from distill.llamacpp import free_port
from distill.records import iter_json_lines

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


@contextmanager
def llama_server(tools, model: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A llama-server on the loopback interface, with its process (``serve`` hides it, and this
    test must kill it)."""
    port = free_port()
    cmd = [
        str(tools.tool("llama-server")),
        *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", "2", "--ctx-size", "1024", "--threads", "1", "--no-webui"),
    ]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server not healthy after 120 s"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_killing_one_of_two_servers_loses_and_duplicates_no_row(
    tmp_path: Path, tiny_gguf: Path, llama_tools, caplog: pytest.LogCaptureFixture
) -> None:
    rows = 40
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"q{i:02d}", "user": f"Question numéro {i}: c'est quoi une tuque?"})
            + "\n"
            for i in range(rows)
        ),
        encoding="utf-8",
    )
    with (
        llama_server(llama_tools, tiny_gguf, tmp_path / "a.log") as (url_a, _),
        llama_server(llama_tools, tiny_gguf, tmp_path / "b.log") as (url_b, proc_b),
    ):
        args = LabelArgs(
            input=source,
            output=tmp_path / "out.jsonl",
            teacher_url=f"{url_a}#2,{url_b}#2",
            batch_size=8,
            max_new_tokens=48,
            quality_gate=False,  # a random tiny model writes no sentences
            request_timeout=60,
        )
        teacher = OpenAITeacher(args)
        a, b = teacher.pool.servers
        killed: list[tuple[int, int]] = []  # (B's answers, B's requests in flight) at the kill

        def kill_b_while_busy() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if b.answered >= 4 and b.outstanding > 0:
                    os.kill(proc_b.pid, signal.SIGKILL)
                    killed.append((b.answered, b.outstanding))
                    return
                time.sleep(0.001)

        killer = threading.Thread(target=kill_b_while_busy, daemon=True)
        killer.start()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="distill.label.servers"):
            summary = label_stage.label(args, teacher=teacher)
        seconds = time.monotonic() - started
        killer.join(timeout=5)

    assert killed, "server B was never seen busy"
    assert proc_b.wait(timeout=10) == -signal.SIGKILL
    ids = Counter(row["id"] for _, row in iter_json_lines(args.output))
    assert ids == Counter(f"q{i:02d}" for i in range(rows))  # each exactly once
    assert not args.rejects_path.exists() or args.rejects_path.read_text() == ""
    assert summary.labelled == rows
    # B answered until the kill, then failed; its rows went to A, each answered once in all.
    assert killed[0][0] <= b.answered <= killed[0][0] + killed[0][1]
    assert b.failed >= 1
    assert a.answered + b.answered == rows
    assert any(url_b in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
    answered_by = Counter(
        row["metadata"]["provenance"]["labeller"]["server"]
        for _, row in iter_json_lines(args.output)
    )
    assert answered_by == {f"{url_a}/v1": a.answered, f"{url_b}/v1": b.answered}
    print(
        f"\n{rows} rows in {seconds:.1f}s; B killed after {killed[0][0]} answers with "
        f"{killed[0][1]} in flight; A answered {a.answered}, B {b.answered}; "
        f"B failed {b.failed} requests (retried on A), taken out {b.outages} times"
    )
