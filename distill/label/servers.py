"""Several teacher servers behind one ``--teacher-url``: the flag's syntax, load spreading,
failover, ``Retry-After`` and jittered back-off.

    --teacher-url http://gpu1:8080#8,http://gpu2:8080#2   # 8 and 2 requests at a time
    --teacher-url http://127.0.0.1:8080 --concurrency 4     # no #N: --concurrency

URLs are separated by commas; ``#N`` after a URL (a fragment, never sent to the server) is its
concurrency, ``--concurrency`` where it is left out. Each request goes to the least loaded server:
the fewest outstanding requests for its concurrency, so a slow server gets fewer rows.

A failed request (connection lost, HTTP 408, 429 or 5xx) is sent again, to whichever server is
then least loaded. The server that failed waits first: for its ``Retry-After`` when it sends one,
else 1, 2, 4... seconds; both with random jitter, so that retries do not come back together,
and never sooner than ``Retry-After``. With several servers, three failures in a row take a
server out for 15 s (doubled at each new outage, up to 4 minutes) with a warning; back from a
pause it gets one request at a time until one succeeds.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Statuses worth sending again: the server is busy or broken, the request itself is fine.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# A Retry-After longer than this is read as this (a misconfigured proxy must not stall a run).
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True)
class ServerSpec:
    """One server of ``--teacher-url``: its base URL (ending in ``/v1``) and concurrency."""

    url: str
    concurrency: int


def parse_teacher_urls(value: str, default_concurrency: int) -> list[ServerSpec]:
    """``URL[#N][,URL[#N]...]`` as server specs; a bad part raises a one-line ``ValueError``."""
    specs: list[ServerSpec] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"--teacher-url {value!r}: an empty URL between commas")
        url, hashed, count = part.partition("#")
        concurrency = default_concurrency
        if hashed:
            if not re.fullmatch(r"[0-9]+", count) or int(count) == 0:
                raise ValueError(
                    f"--teacher-url {part!r}: the concurrency after '#' must be a positive "
                    f"whole number, got {count!r}"
                )
            concurrency = int(count)
        try:
            parsed = urlsplit(url)
            parsed.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError as err:
            raise ValueError(f"--teacher-url {part!r}: {err}") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--teacher-url {part!r}: not an http:// or https:// URL")
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        if any(spec.url == base for spec in specs):
            raise ValueError(f"--teacher-url {value!r}: {base} is given twice")
        specs.append(ServerSpec(base, concurrency))
    return specs


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date), at most
    :data:`MAX_RETRY_AFTER`; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass
class Server:
    """A server's state in the pool, and what it did (for the run's summary)."""

    url: str
    concurrency: int
    outstanding: int = 0
    failures: int = 0  # in a row
    outages: int = 0  # times taken out
    not_before: float = 0.0  # time.monotonic() before which it gets nothing
    answered: int = 0
    failed: int = 0

    def load(self) -> tuple[float, int]:
        """Sort key: outstanding requests for its concurrency, then outstanding requests."""
        return self.outstanding / self.concurrency, self.outstanding

    def stats(self) -> dict[str, int]:
        """Requests answered and failed, times taken out."""
        return {"answered": self.answered, "failed": self.failed, "outages": self.outages}


class Pool:
    """The teacher servers, shared by the request threads: who gets the next request.

    ``backoff`` (first wait after a failure) and ``pause`` (first outage) are attributes so
    that tests can shorten them.
    """

    take_out_after = 3
    max_pause = 240.0

    def __init__(self, specs: list[ServerSpec], seed: int | None = None) -> None:
        if not specs:
            raise ValueError("a pool needs at least one server")
        self.servers = [Server(spec.url, spec.concurrency) for spec in specs]
        self.backoff = 1.0
        self.pause = 15.0
        self._cond = threading.Condition()
        self._random = random.Random(seed)

    @property
    def capacity(self) -> int:
        """Requests in flight when every server is full: the thread count that keeps them so."""
        return sum(server.concurrency for server in self.servers)

    def _has_room(self, server: Server, now: float) -> bool:
        if now < server.not_before:
            return False
        limit = 1 if self._is_out(server) else server.concurrency
        return server.outstanding < limit

    def _is_out(self, server: Server) -> bool:
        return len(self.servers) > 1 and server.failures >= self.take_out_after

    def acquire(self) -> Server:
        """The least loaded server with room, waiting for one when none has; counts the request
        as outstanding there until :meth:`succeeded`, :meth:`failed` or :meth:`release`."""
        with self._cond:
            while True:
                now = time.monotonic()
                ready = [s for s in self.servers if self._has_room(s, now)]
                if ready:
                    server = min(ready, key=Server.load)  # ties: the first listed
                    server.outstanding += 1
                    return server
                waits = [s.not_before - now for s in self.servers if s.not_before > now]
                self._cond.wait(timeout=min(waits) if waits else None)

    def release(self, server: Server) -> None:
        """The request ended without telling anything about the server (it refused the
        request itself)."""
        with self._cond:
            server.outstanding -= 1
            self._cond.notify_all()

    def succeeded(self, server: Server) -> None:
        """The server answered."""
        with self._cond:
            server.outstanding -= 1
            server.answered += 1
            if self._is_out(server):
                log.warning("teacher server %s answers again: back in", server.url)
            server.failures = 0
            self._cond.notify_all()

    def failed(self, server: Server, problem: str, wait: float | None = None) -> float:
        """The server failed a request (``wait``: its ``Retry-After``); returns how long it
        now gets nothing."""
        with self._cond:
            server.outstanding -= 1
            server.failed += 1
            server.failures += 1
            now = time.monotonic()
            if self._is_out(server):
                # Requests sent before the outage began fail too: they do not lengthen it.
                if now >= server.not_before:
                    server.outages += 1
                    pause = min(self.pause * 2 ** (server.outages - 1), self.max_pause)
                    pause = max(pause, wait or 0.0) * self._random.uniform(1.0, 1.25)
                    server.not_before = now + pause
                    log.warning(
                        "teacher server %s failed %d times in a row (last: %s): taken out "
                        "for %.0fs, its requests go to the others",
                        server.url,
                        server.failures,
                        problem,
                        pause,
                    )
            else:
                if wait is not None:  # never sooner than asked, a little later at random
                    delay = wait * self._random.uniform(1.0, 1.25)
                else:
                    delay = self.backoff * 2 ** (server.failures - 1)
                    delay *= self._random.uniform(0.5, 1.5)
                server.not_before = max(server.not_before, now + delay)
                log.warning(
                    "teacher server %s: request failed (%s); it waits %.1fs",
                    server.url,
                    problem,
                    delay,
                )
            self._cond.notify_all()
            return max(server.not_before - now, 0.0)

    def take_out(self, server: Server, problem: str) -> None:
        """Take a server out from the start (unreachable when probed), when others remain."""
        with self._cond:
            server.failures = self.take_out_after
            server.outages += 1
            server.not_before = time.monotonic() + self.pause
            log.warning(
                "teacher server %s unreachable (%s): taken out for %.0fs",
                server.url,
                problem,
                self.pause,
            )
