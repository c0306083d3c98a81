"""Run a pipeline command (``distill label ...``) in threads and post its output as messages.

    proc = CommandRun(["distill", "label", ...], env={...}, post=screen.post_message)
    proc.start()   # ProcessOutput per line, ProcessProgress per tqdm update, then ProcessExited
    proc.cancel()  # SIGTERM (the stages stop cleanly on it)

tqdm redraws its bar on stderr with ``\\r`` and no newline, so stderr is read in chunks and split
on both ``\\r`` and ``\\n``; a piece that looks like a bar (`` 42%|####  | 42/100 [...]``) becomes a
``ProcessProgress``, anything else a line of log.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from textual.message import Message

from tui.messages import ProcessExited, ProcessOutput, ProcessProgress

Post = Callable[[Message], object]

# tqdm's default bar: "desc:  42%|████▏     | 42/100 [00:01<00:02, 20.1it/s]"
PROGRESS = re.compile(r"(?:^|\s|:)(\d{1,3}(?:\.\d+)?)%\|")


def parse_progress(text: str) -> float | None:
    """The percentage of a tqdm bar, or ``None`` when ``text`` is not one."""
    match = PROGRESS.search(text)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 100.0 else None


def split_updates(chunks: Iterator[str]) -> Iterator[str]:
    """Pieces of a stream cut at ``\\r`` and ``\\n`` (a trailing piece waits for its end)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *done, pending = re.split(r"\r\n|\r|\n", pending)
        yield from (piece for piece in done if piece.strip())
    if pending.strip():
        yield pending


def _chunks(stream: IO[bytes]) -> Iterator[str]:
    while True:
        data = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not data:
            return
        yield data.decode("utf-8", "replace")


class CommandRun:
    """One command; stdout and stderr each read by a thread that only posts messages."""

    def __init__(
        self,
        argv: list[str],
        post: Post,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self._post = post
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process and its reader thread; a failure to start is posted, not raised."""
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as err:
            self._post(ProcessExited(None, f"cannot start {self.argv[0]}: {err.strerror or err}"))
            return
        threading.Thread(target=self._read, name="pipeline-reader", daemon=True).start()

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM)."""
        if self.running and self._proc is not None:
            self._proc.terminate()

    def _pump(self, stream: IO[bytes], name: str) -> None:
        for piece in split_updates(_chunks(stream)):
            percent = parse_progress(piece) if name == "stderr" else None
            if percent is None:
                self._post(ProcessOutput(piece, name))
            else:
                self._post(ProcessProgress(percent, piece.strip()))

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        out = threading.Thread(target=self._pump, args=(proc.stdout, "stdout"), daemon=True)
        out.start()
        self._pump(proc.stderr, "stderr")
        out.join()
        self._post(ProcessExited(proc.wait()))
