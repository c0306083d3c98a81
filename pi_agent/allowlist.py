"""The models this Pi may install and activate: ``store.allowlist_file``, one sha256 a line.

The bearer token says who may call the agent, not what it may run: with a list written by the
Ansible role, a leaked token installs and activates only the fleet's own models. The file is read
again when its inode, size or modification time change, and on SIGHUP (a new ``Allowlist``). A
missing or malformed file refuses everything (fail closed): its error is the 403's reason.

    # the fleet's models
    3f1c...e9a0  # smollm2-135m-distilled v4
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pi_agent.config import ConfigError
from pi_agent.store import SHA256_RE, StoreError

log = logging.getLogger(__name__)


def parse(text: str, source: str) -> frozenset[str]:
    """The sha256s of an allowlist's text (lowercased); a bad line is a ``ConfigError``."""
    listed = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not SHA256_RE.fullmatch(entry):
            raise ConfigError(f"store.allowlist_file {source} line {number}: not a sha256")
        listed.add(entry)
    return frozenset(listed)


class Allowlist:
    """``store.allowlist_file`` as it is now; ``check`` is safe from worker threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime of the last read
        self._listed: frozenset[str] = frozenset()
        self._error = ""

    def load(self) -> frozenset[str]:
        """Read the file if it changed since the last read; the listed sha256s, or the
        ``ConfigError`` that refuses everything."""
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as exc:
                self._failed(None, f"{self.path}: {exc.strerror}")
            else:
                seen = (st.st_ino, st.st_size, st.st_mtime_ns)
                if seen != self._seen:
                    self._read(seen)
            if self._error:
                raise ConfigError(f"store.allowlist_file {self._error}")
            return self._listed

    def _read(self, seen: tuple[int, int, int]) -> None:
        try:
            listed = parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError) as exc:
            self._failed(seen, f"{self.path}: {getattr(exc, 'strerror', None) or exc}")
        except ConfigError as exc:
            self._failed(seen, str(exc).removeprefix("store.allowlist_file "))
        else:
            self._seen, self._listed, self._error = seen, listed, ""
            log.info("allowlist %s: %d model(s)", self.path, len(listed))

    def _failed(self, seen: tuple[int, int, int] | None, error: str) -> None:
        if error != self._error:
            log.error("allowlist %s; every install and activation is refused", error)
        self._seen, self._listed, self._error = seen, frozenset(), error

    def check(self, sha256: str) -> None:
        """Nothing when ``sha256`` is listed, else a ``StoreError`` 403 that names it."""
        try:
            listed = self.load()
        except ConfigError as exc:
            raise StoreError(f"sha256 {sha256} refused: {exc}", 403) from None
        if str(sha256).lower() not in listed:
            raise StoreError(f"sha256 {sha256} is not in the allowlist ({self.path})", 403)
