"""Pipeline commands: tqdm's carriage returns become progress, other output becomes log lines."""

from __future__ import annotations

import sys
import threading

import pytest

from tui.messages import ProcessExited, ProcessOutput, ProcessProgress
from tui.process import CommandRun, parse_progress, split_updates

# What `distill label` prints: a log line, a tqdm bar redrawn with \r, a JSON summary on stdout.
SCRIPT = r"""
import sys
sys.stderr.write("loading the teacher\n"); sys.stderr.flush()
for n in (0, 50, 100):
    sys.stderr.write(f"\rlabel: {n:3d}%|{'#' * (n // 10):10s}| {n}/100 [00:01<00:00, 9.9it/s]")
    sys.stderr.flush()
sys.stderr.write("\n")
print('{"labelled": 100}')
sys.exit(3)
"""


@pytest.mark.parametrize(
    ("text", "percent"),
    [
        ("label:  42%|████▏     | 42/100 [00:01<00:02, 20.1it/s]", 42.0),
        ("100%|██████████| 10/10", 100.0),
        ("loading 50% of the shards", None),
        ("12 rows", None),
    ],
    ids=["a bar with a description", "a bare bar", "a percent that is not a bar", "no percent"],
)
def test_parse_progress(text: str, percent: float | None) -> None:
    assert parse_progress(text) == percent


def test_split_updates_cuts_at_carriage_returns_across_chunks() -> None:
    chunks = iter(["a\rb", "c\r\nd\n", "\re"])
    assert list(split_updates(chunks)) == ["a", "bc", "d", "e"]


def test_a_command_posts_lines_progress_and_its_exit_code() -> None:
    posted: list[object] = []
    done = threading.Event()

    def post(message: object) -> None:
        posted.append(message)
        if isinstance(message, ProcessExited):
            done.set()

    CommandRun([sys.executable, "-c", SCRIPT], post).start()
    assert done.wait(30)
    progress = [m.percent for m in posted if isinstance(m, ProcessProgress)]
    lines = {(m.stream, m.line) for m in posted if isinstance(m, ProcessOutput)}
    assert progress == [0.0, 50.0, 100.0]
    assert ("stderr", "loading the teacher") in lines
    assert ("stdout", '{"labelled": 100}') in lines
    assert posted[-1].returncode == 3


def test_a_missing_program_is_posted_not_raised() -> None:
    posted: list[object] = []
    CommandRun(["/nonexistent/distill"], posted.append).start()
    assert isinstance(posted[0], ProcessExited) and "cannot start" in posted[0].error
