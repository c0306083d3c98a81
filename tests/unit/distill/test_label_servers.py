"""Several ``--teacher-url`` servers: the flag's syntax, load spreading, failover, Retry-After.

The servers here are real HTTP servers on the loopback interface that speak just enough of the
OpenAI API (``/v1/models``, ``/v1/chat/completions``); each request's handling is a function
the test chooses (answer, wait, refuse with 429, hang up).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from distill import label as label_stage
from distill.label import LabelArgs, LabelError, OpenAITeacher
from distill.label.servers import (
    MAX_RETRY_AFTER,
    Pool,
    ServerSpec,
    parse_teacher_urls,
    retry_after,
)
from distill.records import read_records


@dataclass
class FakeServer:
    """What one loopback server did: the time of each chat request, and how it answers."""

    name: str
    # Called with the request's number (0, 1...): returns (status, headers), or None to hang up.
    reply: Callable[[int], tuple[int, dict[str, str]] | None] = lambda n: (200, {})
    delay: float = 0.0
    requests: list[float] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def _json(self, status: int, body: dict, headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._json(200, {"data": [{"id": fake.name}]}, {})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with fake.lock:
                number = len(fake.requests)
                fake.requests.append(time.monotonic())
            time.sleep(fake.delay)
            reply = fake.reply(number)
            if reply is None:  # a server that died: the connection drops without an answer
                self.close_connection = True
                return
            status, headers = reply
            body = {
                "choices": [
                    {"message": {"content": f"Réponse de {fake.name}."}, "finish_reason": "stop"}
                ],
                "usage": {"completion_tokens": 3},
            }
            self._json(status, body if status == 200 else {"error": "busy"}, headers)

    return Handler


@contextmanager
def serving(*fakes: FakeServer) -> Iterator[list[FakeServer]]:
    servers = []
    try:
        for fake in fakes:
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            servers.append(httpd)
            fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        yield list(fakes)
    finally:
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()


def prompts(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"r{i:02d}", "user": f"Question {i}?"}) + "\n")
    return path


def label_args(tmp_path: Path, urls: str, n: int = 12, **changes) -> LabelArgs:
    return LabelArgs(
        input=prompts(tmp_path / "in.jsonl", n),
        output=tmp_path / "out.jsonl",
        teacher_url=urls,
        quality_gate=False,
        request_timeout=5,
        **changes,
    )


def fast(teacher: OpenAITeacher) -> OpenAITeacher:
    """Back-off and outages in tens of milliseconds instead of seconds."""
    teacher.pool.backoff = 0.02
    teacher.pool.pause = 0.2
    return teacher


# --- the flag's syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://a:8080", [("http://a:8080/v1", 4)]),
        ("http://a:8080/v1/", [("http://a:8080/v1", 4)]),
        ("http://a:8080#8, https://b/v1#2", [("http://a:8080/v1", 8), ("https://b/v1", 2)]),
        ("http://a#1,http://b", [("http://a/v1", 1), ("http://b/v1", 4)]),
    ],
    ids=[
        "one URL takes --concurrency",
        "a trailing /v1/ is kept once",
        "two URLs, two #N",
        "mixed",
    ],
)
def test_teacher_urls_parse_with_their_concurrency(value: str, expected: list) -> None:
    assert parse_teacher_urls(value, 4) == [ServerSpec(url, n) for url, n in expected]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://a#0", r"--teacher-url 'http://a#0': the concurrency after '#' must be a positive"),
        ("http://a#x", r"--teacher-url 'http://a#x': .* got 'x'"),
        ("http://a#-2", r"got '-2'"),
        ("http://a#", r"got ''"),
        ("http://a,,http://b", r"an empty URL between commas"),
        ("a:8080", r"--teacher-url 'a:8080': not an http:// or https:// URL"),
        ("http://a:99999", r"--teacher-url 'http://a:99999': Port out of range"),
        ("http://a,http://a/v1", r"http://a/v1 is given twice"),
    ],
    ids=[
        "zero concurrency",
        "a word for a number",
        "negative concurrency",
        "nothing after #",
        "two commas",
        "no scheme",
        "port out of range",
        "one server twice",
    ],
)
def test_a_bad_teacher_url_fails_at_parse_time_in_one_line(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        LabelArgs(input=Path("in.jsonl"), output=Path("out.jsonl"), teacher_url=value)
    assert "\n" not in str(caught.value)


def test_a_bad_teacher_url_on_the_command_line_exits_with_the_flag_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.cli import main

    source = prompts(tmp_path / "in.jsonl", 1)
    argv = ["label", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--teacher-url", "http://a:8080#many"]) != 0
    assert "--teacher-url 'http://a:8080#many'" in capsys.readouterr().err


# --- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("3") == 3.0
    assert retry_after(" 0.5 ") == 0.5
    assert retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert retry_after("-4") == 0.0
    assert retry_after("86400") == MAX_RETRY_AFTER
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("nan") is None


def test_a_429_with_retry_after_is_waited_out_then_answered(tmp_path: Path) -> None:
    busy_once = FakeServer(
        "busy", reply=lambda n: (429, {"Retry-After": "1"}) if n == 0 else (200, {})
    )
    with serving(busy_once) as (fake,):
        args = label_args(tmp_path, fake.url, n=1)
        summary = label_stage.label(args, teacher=fast(OpenAITeacher(args)))
    assert summary.labelled == 1
    assert len(fake.requests) == 2
    # Back-off alone would have waited ~0.02 s; Retry-After asked for a second, jitter adds.
    waited = fake.requests[1] - fake.requests[0]
    assert 1.0 <= waited < 2.0, waited
    assert summary.servers[f"{fake.url}/v1"] == {"answered": 1, "failed": 1, "outages": 0}


def test_while_one_server_asks_to_wait_the_other_answers(tmp_path: Path) -> None:
    slow_down = FakeServer(
        "a", reply=lambda n: (503, {"Retry-After": "30"}) if n == 0 else (200, {})
    )
    other = FakeServer("b")
    with serving(slow_down, other) as (a, b):
        args = label_args(tmp_path, f"{a.url}#1,{b.url}#1", n=6)
        started = time.monotonic()
        summary = label_stage.label(args, teacher=fast(OpenAITeacher(args)))
    assert summary.labelled == 6
    assert time.monotonic() - started < 10  # nobody waited the 30 s
    assert len(a.requests) == 1  # asked to wait 30 s: not asked again during the run
    assert len(b.requests) == 6


def test_retries_after_failures_are_jittered() -> None:
    pool = Pool([ServerSpec("http://a/v1", 4)], seed=1)
    waits = []
    for _ in range(5):
        server = pool.acquire()
        waits.append(pool.failed(server, "HTTP 500"))
        server.not_before, server.failures = 0.0, 0  # measure each first wait alone
    assert all(0.5 <= w <= 1.5 for w in waits), waits
    assert len({round(w, 6) for w in waits}) == 5  # not one fixed delay


# --- load spreading ------------------------------------------------------------------------------


def test_the_least_loaded_server_gets_the_next_request() -> None:
    pool = Pool([ServerSpec("http://a/v1", 4), ServerSpec("http://b/v1", 2)])
    a, b = pool.servers
    # Outstanding per concurrency, then fewest outstanding, then the first listed.
    picks = [pool.acquire() for _ in range(6)]
    assert [s.url[-4] for s in picks] == ["a", "b", "a", "b", "a", "a"]
    assert (a.outstanding, b.outstanding) == (4, 2)
    pool.succeeded(b)
    assert pool.acquire() is b  # the only one with room


def test_a_full_pool_makes_the_next_request_wait_for_a_free_slot() -> None:
    pool = Pool([ServerSpec("http://a/v1", 1)])
    (a,) = pool.servers
    pool.acquire()
    got: list[float] = []
    waiter = threading.Thread(target=lambda: (pool.acquire(), got.append(time.monotonic())))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # still waiting
    released = time.monotonic()
    pool.succeeded(a)
    waiter.join(timeout=5)
    assert got and got[0] >= released


def test_a_slow_server_gets_fewer_rows_than_a_fast_one(tmp_path: Path) -> None:
    slow, quick = FakeServer("slow", delay=0.5), FakeServer("quick", delay=0.01)
    with serving(slow, quick) as (s, q):
        args = label_args(tmp_path, f"{s.url}#2,{q.url}#2", n=24, batch_size=24)
        summary = label_stage.label(args, teacher=OpenAITeacher(args))
    assert summary.labelled == 24
    assert len(s.requests) + len(q.requests) == 24
    assert len(q.requests) >= 3 * len(s.requests), (len(s.requests), len(q.requests))
    rows = read_records(args.output)
    answered_by = {r.metadata["provenance"]["labeller"]["server"] for r in rows}
    assert answered_by == {f"{s.url}/v1", f"{q.url}/v1"}
    servers = rows[0].metadata["provenance"]["labeller"]["servers"]
    assert servers == [
        {"url": f"{s.url}/v1", "concurrency": 2, "model": "slow"},
        {"url": f"{q.url}/v1", "concurrency": 2, "model": "quick"},
    ]


# --- failover ------------------------------------------------------------------------------------


def test_a_server_that_hangs_up_is_taken_out_and_its_rows_go_to_the_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = FakeServer("dead", reply=lambda n: None)
    alive = FakeServer("alive", delay=0.05)
    with serving(dead, alive) as (d, a):
        args = label_args(tmp_path, f"{d.url}#2,{a.url}#2", n=20, batch_size=20)
        with caplog.at_level(logging.WARNING, logger="distill.label.servers"):
            summary = label_stage.label(args, teacher=fast(OpenAITeacher(args)))
    assert summary.labelled == 20
    ids = [r.id for r in read_records(args.output)]
    assert ids == [f"r{i:02d}" for i in range(20)]
    dead_stats = summary.servers[f"{d.url}/v1"]
    assert dead_stats["answered"] == 0 and dead_stats["failed"] == len(d.requests) >= 3
    assert dead_stats["outages"] >= 1
    assert summary.servers[f"{a.url}/v1"]["answered"] == 20
    assert any("taken out" in r.getMessage() and d.url in r.getMessage() for r in caplog.records)


def test_a_server_that_comes_back_gets_requests_again(tmp_path: Path) -> None:
    flaky = FakeServer("flaky", reply=lambda n: (500, {}) if n < 3 else (200, {}))
    steady = FakeServer("steady", delay=0.1)
    with serving(flaky, steady) as (f, s):
        args = label_args(tmp_path, f"{f.url}#1,{s.url}#1", n=30, batch_size=30)
        summary = label_stage.label(args, teacher=fast(OpenAITeacher(args)))
    assert summary.labelled == 30
    stats = summary.servers[f"{f.url}/v1"]
    assert stats["failed"] == 3 and stats["outages"] == 1
    assert stats["answered"] > 0  # back in after its pause


def test_an_unreachable_server_at_start_is_left_out_while_another_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(FakeServer("up")) as (up,):
        args = label_args(tmp_path, f"http://127.0.0.1:9#2,{up.url}#2", n=4)
        with caplog.at_level(logging.WARNING, logger="distill.label.servers"):
            summary = label_stage.label(args)
    assert summary.labelled == 4
    assert len(up.requests) == 4
    assert any("http://127.0.0.1:9/v1 unreachable" in r.getMessage() for r in caplog.records)


def test_when_every_server_is_unreachable_the_run_stops_naming_them(tmp_path: Path) -> None:
    args = label_args(tmp_path, "http://127.0.0.1:9,http://127.0.0.1:7", n=2)
    with pytest.raises(
        LabelError,
        match=r"server http://127.0.0.1:9/v1 unreachable: .*; .*127.0.0.1:7/v1 unreachable",
    ):
        label_stage.label(args)
    assert not args.output.exists()


def test_a_row_that_fails_everywhere_stops_the_run_and_writes_nothing(tmp_path: Path) -> None:
    broken = FakeServer("broken", reply=lambda n: (502, {}))
    with serving(broken) as (b,):
        args = label_args(tmp_path, b.url, n=1)
        with pytest.raises(LabelError, match=r"failed 4 times; last: HTTP 502"):
            label_stage.label(args, teacher=fast(OpenAITeacher(args)))
    assert len(b.requests) == 4
    assert not args.output.exists() or args.output.read_text() == ""
