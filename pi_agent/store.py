"""The model store: installed versions, the active one behind an atomic symlink, rollback.

Layout under ``<state_dir>/models``::

    versions/<version>/model.gguf      the weights
    versions/<version>/manifest.json   name, version, sha256, size, installed_at (written last)
    current  -> versions/<version>     what llama-server serves
    previous -> versions/<version>     what a rollback returns to

and, on the same file system (``<state_dir>/incoming`` unless configured), the incoming folder
where a downloader run as root drops files that ``install_path`` then moves in by rename.

A version directory appears by one rename of a fully written and verified directory, and the
links change by one rename each (``fsutil.atomic_symlink``), so a kill -9 or a power cut at any
moment leaves ``current`` on the old model or the new one, each intact. ``recover()`` sweeps the
leftovers of an interrupted install or switch at start-up.

Each install writes in its own ``versions/.incoming-<version>-<random>`` and holds the version's
lock (``flock`` on ``versions/.<version>.lock``) from ``begin`` to its commit or abort: an upload,
a download and a move from the incoming folder run in the agent's threads, and another process may
open the store too. A second install of a version waits, then finds it installed (409).

With an ``admit`` check (``pi_agent.allowlist``), an install is refused on its declared sha256
before a byte is written, and again on the computed one at the commit; switches check it too.
An ``inspect`` check reads the verified weights before the commit (the GGUF's kind).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from pi_agent.fsutil import atomic_symlink, atomic_write, fsync_dir, sha256_file

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MODEL_FILE = "model.gguf"
MANIFEST = "manifest.json"
MIB = 1 << 20
MAX_NAME = 128  # a version's display name, in characters
INSTALL_WAIT_S = 3600.0  # how long an install waits for another install of the same version
_FULL = (errno.ENOSPC, errno.EDQUOT)


class StoreError(Exception):
    """A refused store operation; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ModelStore:
    """Model versions under ``root`` (``<state_dir>/models``)."""

    def __init__(
        self,
        root: Path,
        keep: int = 3,
        margin_bytes: int = 0,
        incoming_dir: Path | None = None,
        admit: Callable[[str], None] | None = None,
        inspect: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.current = self.root / "current"
        self.previous = self.root / "previous"
        self.keep = keep
        self.margin_bytes = margin_bytes
        self.incoming_dir = Path(incoming_dir) if incoming_dir is not None else None
        self._admit = admit
        self._inspect = inspect  # refuses weights of the wrong kind (pi_agent.gguf.expect_kind)

    def check_allowed(self, sha256: str) -> None:
        """Raise the ``StoreError`` (403) of the ``admit`` check when it refuses ``sha256``."""
        if self._admit is not None:
            self._admit(sha256)

    def make_incoming_dir(self) -> None:
        """Create the incoming folder (0770: the agent's group may drop files too) if missing."""
        if self.incoming_dir is None:
            return
        try:
            self.incoming_dir.mkdir(parents=True)
        except FileExistsError:
            return  # whoever made it chose its owner and mode
        self.incoming_dir.chmod(0o770)  # mkdir's mode goes through the umask

    def recover(self) -> None:
        """Create the layout and drop what an interrupted install or switch left behind."""
        self.versions.mkdir(parents=True, exist_ok=True)
        self.make_incoming_dir()
        for leftover in self.root.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        for leftover in self.versions.glob(".incoming-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for link in (self.current, self.previous):
            if link.is_symlink() and not link.exists():
                link.unlink()

    # reading

    def _link_version(self, link: Path) -> str | None:
        try:
            return link.readlink().name
        except OSError:
            return None

    def active(self) -> str | None:
        """The active version's name, or ``None`` before the first switch."""
        return self._link_version(self.current)

    def previous_version(self) -> str | None:
        """The version a rollback returns to."""
        return self._link_version(self.previous)

    def active_model(self) -> Path | None:
        """Path of the active weights (through the link, so a switch is seen at once)."""
        version = self.active()
        return self.current / MODEL_FILE if version else None

    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest (404 when it is not installed)."""
        self._check_name(version)
        try:
            return json.loads((self.versions / version / MANIFEST).read_text())
        except (OSError, ValueError):
            raise StoreError(f"model version {version!r} is not installed", 404) from None

    def list(self) -> list[dict[str, Any]]:
        """Every installed version, oldest first, with ``active`` and ``previous`` flags."""
        active, previous = self.active(), self.previous_version()
        out = []
        for path in self.versions.iterdir() if self.versions.is_dir() else ():
            if path.name.startswith(".") or not (path / MANIFEST).is_file():
                continue
            with contextlib.suppress(StoreError):
                item = self.manifest(path.name)
                item["active"] = path.name == active
                item["previous"] = path.name == previous
                out.append(item)
        return sorted(out, key=lambda m: (m.get("installed_at", 0), m["version"]))

    def open_blob(self, sha256: str) -> BinaryIO:
        """The weights of an installed version with this sha256, opened (404 when none).

        The open file must be the one its manifest describes: same size, inode and modification
        time as at install. A file that differs (copied back from a backup, say) is hashed once,
        served and recorded when its sha256 matches, else refused. The open file stays whole
        even if the version is removed while it is being read.
        """
        for manifest in self.list():
            if manifest["sha256"] != sha256:
                continue
            try:
                handle = (self.versions / manifest["version"] / MODEL_FILE).open("rb")
            except OSError:
                continue  # removed since it was listed
            if self._same_file(manifest, handle):
                return handle
            handle.close()
        raise StoreError(f"no installed model has sha256 {sha256}", 404)

    def _same_file(self, manifest: dict[str, Any], handle: BinaryIO) -> bool:
        st = os.fstat(handle.fileno())
        if st.st_size != manifest["size"]:
            return False
        if identity(st) == {k: manifest.get(k) for k in ("inode", "mtime_ns")}:
            return True
        version = manifest["version"]
        digest = hashlib.sha256()
        while block := handle.read(MIB):
            digest.update(block)
        handle.seek(0)
        if digest.hexdigest() != manifest["sha256"]:
            log.error("model version %s: its weights no longer match their sha256", version)
            return False
        manifest = {k: v for k, v in manifest.items() if k not in ("active", "previous")}
        manifest.update(identity(st))  # rehashed once: recorded as it is now
        with contextlib.suppress(OSError):
            atomic_write(self.versions / version / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return True

    def verify(self, version: str) -> dict[str, Any]:
        """The manifest, after checking the weights' size and sha256 against it."""
        manifest = self.manifest(version)
        model = self.versions / version / MODEL_FILE
        try:
            size = model.stat().st_size
        except OSError:
            raise StoreError(f"model version {version!r} has no weights", 409) from None
        if size != manifest["size"] or sha256_file(model) != manifest["sha256"]:
            raise StoreError(f"model version {version!r} is corrupt (sha256 mismatch)", 409)
        return manifest

    # installing

    def _check_name(self, version: str) -> None:
        if (
            not isinstance(version, str)
            or not VERSION_RE.fullmatch(version)
            or version == "rollback"
        ):
            raise StoreError(f"bad version name {version!r} (letters, digits, . _ -)", 400)

    def lock(self, version: str) -> VersionLock:
        """The lock that one install of ``version`` holds at a time (not yet acquired)."""
        self._check_name(version)
        return VersionLock(self.versions / f".{version}.lock", version)

    def free_bytes(self) -> int:
        """Free space on the store's file system."""
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    def _check_space(self, incoming: int) -> None:
        left = self.free_bytes() - incoming
        if left < self.margin_bytes:
            raise StoreError(
                f"not enough space: installing {incoming / MIB:.1f} MiB would leave "
                f"{max(left, 0) / MIB:.1f} MiB, under the {self.margin_bytes / MIB:.0f} MiB margin",
                507,
            )

    def begin(
        self,
        version: str,
        sha256: str,
        name: str = "",
        size_hint: int | None = None,
        source: str = "upload",
        wait: float = INSTALL_WAIT_S,
    ) -> Incoming:
        """Start writing a version (every check that can fail early fails here), holding its
        lock until the commit or the abort; waits up to ``wait`` seconds for another install of
        the same version to end."""
        self._check_name(version)
        sha256 = sha256.lower() if isinstance(sha256, str) else ""
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError("sha256 must be 64 hex digits", 400)
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise StoreError(f"name longer than {MAX_NAME} characters", 400)
        self.check_allowed(sha256)
        self.versions.mkdir(parents=True, exist_ok=True)
        lock = self.lock(version)
        lock.acquire(wait)
        try:
            if (self.versions / version).exists():
                raise StoreError(f"model version {version!r} is already installed", 409)
            if size_hint is not None:
                self._check_space(size_hint)
            return Incoming(self, version, sha256, name or version, size_hint, source, lock)
        except BaseException:
            lock.release()
            raise

    def install(
        self,
        version: str,
        chunks: Iterable[bytes],
        sha256: str,
        name: str = "",
        size_hint: int | None = None,
        source: str = "upload",
    ) -> dict[str, Any]:
        """Write a version from ``chunks``, verify its sha256, then publish it by one rename."""
        incoming = self.begin(version, sha256, name, size_hint, source)
        try:
            for chunk in chunks:
                incoming.write(chunk)
        except BaseException:
            incoming.abort()
            raise
        return incoming.commit()

    def install_file(
        self,
        version: str,
        path: Path,
        sha256: str | None = None,
        name: str = "",
    ) -> dict[str, Any]:
        """Install a local file (its own sha256 unless one is given to check against)."""
        path = Path(path)
        expected = sha256 or sha256_file(path)

        def read() -> Iterable[bytes]:
            with path.open("rb") as handle:
                while block := handle.read(MIB):
                    yield block

        return self.install(
            version, read(), expected, name or path.stem, path.stat().st_size, source=str(path)
        )

    def _open_incoming(self, path: str | Path) -> BinaryIO:
        """Open a file that lies directly in the incoming folder, refusing anything else."""
        text = str(path)
        if self.incoming_dir is None:
            raise StoreError("this store has no incoming folder", 409)
        if "\0" in text or not Path(text).is_absolute():
            raise StoreError(f"path {text!r} must be an absolute path", 400)
        path = Path(text)
        if path.name in ("", ".", "..") or os.path.realpath(path.parent) != os.path.realpath(
            self.incoming_dir
        ):
            raise StoreError(f"path {text!r} is not directly inside {self.incoming_dir}", 400)
        try:
            before = path.lstat()
        except OSError as exc:
            raise StoreError(f"path {text!r}: {exc.strerror}", 400) from None
        if stat.S_ISLNK(before.st_mode):
            raise StoreError(f"path {text!r} is a symlink, not a regular file", 400)
        if not stat.S_ISREG(before.st_mode):
            raise StoreError(f"path {text!r} is not a regular file", 400)
        if before.st_nlink != 1:  # another name could still change the weights once installed
            raise StoreError(f"path {text!r} has other hard links", 400)
        try:
            handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")
        except OSError as exc:
            raise StoreError(f"path {text!r}: {exc.strerror}", 400) from None
        if not os.path.samestat(before, os.fstat(handle.fileno())):
            handle.close()
            raise StoreError(f"path {text!r} was replaced while it was checked", 409)
        return handle

    def install_path(
        self, version: str, path: str | Path, sha256: str, name: str = ""
    ) -> dict[str, Any]:
        """Move a file from the incoming folder into the store by rename, verified by sha256.

        A refused path is left as it is; a file whose sha256 does not match is removed.
        """
        handle = self._open_incoming(path)
        try:
            self._check_space(0)  # the file already lies on this file system
            incoming = self.begin(version, sha256, name, source=str(path))
        except BaseException:
            handle.close()
            raise
        incoming.adopt(Path(path), handle)
        return incoming.commit()

    # switching

    def switch(self, version: str, verify: bool = True) -> str | None:
        """Make ``version`` active; returns the version it replaced (now ``previous``)."""
        if verify:
            self.verify(version)
        else:
            self.manifest(version)
        old = self.active()
        if old == version:
            return old
        if old is not None:
            atomic_symlink(self.previous, f"versions/{old}")
        atomic_symlink(self.current, f"versions/{version}")
        return old

    def restore(self, active: str | None, previous: str | None) -> None:
        """Point ``current`` and ``previous`` at these versions (``None``: no link), ``previous``
        first: a switch moves ``current`` last, so its marker tells the two apart after a kill."""
        for link, version in ((self.previous, previous), (self.current, active)):
            if version is None:
                if link.is_symlink():
                    link.unlink()
                    fsync_dir(self.root)
            elif self._link_version(link) != version:
                atomic_symlink(link, f"versions/{version}")

    def rollback(self) -> str:
        """Switch back to ``previous``; returns the version now active."""
        previous = self.previous_version()
        if previous is None or not (self.versions / previous).is_dir():
            raise StoreError("no previous model version to roll back to", 409)
        self.switch(previous, verify=False)
        return previous

    def remove(self, version: str) -> None:
        """Delete an installed version that is neither active nor the rollback target."""
        self.manifest(version)
        if version in (self.active(), self.previous_version()):
            raise StoreError(f"model version {version!r} is in use (active or previous)", 409)
        trash = tempfile.mkdtemp(prefix=f".incoming-removed-{version}-", dir=self.versions)
        (self.versions / version).rename(trash)  # over the empty directory just made
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self) -> list[str]:
        """Keep the ``keep`` newest versions (never removing active or previous)."""
        versions = self.list()
        removable = [m["version"] for m in versions if not (m["active"] or m["previous"])]
        excess = len(versions) - self.keep
        removed = removable[: max(excess, 0)]
        for version in removed:
            self.remove(version)
        return removed


def identity(st: os.stat_result) -> dict[str, int]:
    """What tells an installed file from another of the same size: its inode and mtime."""
    return {"inode": st.st_ino, "mtime_ns": st.st_mtime_ns}


class VersionLock:
    """An exclusive ``flock`` on a version's lock file; the file is removed on release, so the
    holder checks after locking that the file it locked still has the name."""

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = self.path.stat()
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return False
        if not os.path.samestat(current, os.fstat(fd)):  # released and removed meanwhile
            os.close(fd)
            return False
        self.fd = fd
        return True

    def acquire(self, wait: float) -> None:
        """Take the lock, waiting up to ``wait`` seconds (409 after that)."""
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise StoreError(f"another install of {self.version!r} is still running", 409)
            time.sleep(0.05)

    def release(self) -> None:
        """Remove the lock file, then let the lock go."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


class Incoming:
    """A version being written under its own ``versions/.incoming-*``, holding the version's lock;
    ``commit`` publishes it, ``abort`` drops it. ``write`` may run in a worker thread while the
    event loop calls ``abort``: they take turns."""

    def __init__(
        self,
        store: ModelStore,
        version: str,
        sha256: str,
        name: str,
        size_hint: int | None,
        source: str,
        lock: VersionLock,
    ) -> None:
        self.store = store
        self.version = version
        self.sha256 = sha256
        self.name = name
        self.size_hint = size_hint
        self.source = source
        self.lock = lock
        self.size = 0
        self.digest = hashlib.sha256()
        self._turn = threading.Lock()
        self.dir = Path(tempfile.mkdtemp(prefix=f".incoming-{version}-", dir=store.versions))
        try:
            self.handle = (self.dir / MODEL_FILE).open("wb")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def write(self, chunk: bytes) -> None:
        """Append a chunk (keeping the free-space margin when the size was not announced)."""
        with self._turn:
            try:
                self.handle.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)
                before = self.size - len(chunk)
                if self.size_hint is None and (
                    before == 0 or before // (64 * MIB) != self.size // (64 * MIB)
                ):
                    self.store._check_space(0)
            except BaseException as exc:
                self._drop()
                _raise_if_full(exc)
                raise

    def adopt(self, path: Path, handle: BinaryIO) -> None:
        """Take the file at ``path`` (open as ``handle``) as the weights by one rename, and hash
        it; on any failure the version is dropped."""
        try:
            self.handle.close()
            self.handle = handle  # commit flushes it: the downloader may not have
            target = self.dir / MODEL_FILE
            try:
                path.rename(target)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise StoreError(
                        f"{path} is on another file system than the store; "
                        "store.incoming_dir must be on the store's",
                        409,
                    ) from None
                raise StoreError(f"cannot move {path}: {exc.strerror}", 409) from None
            if not os.path.samestat(target.lstat(), os.fstat(handle.fileno())):
                raise StoreError(f"{path} was replaced while it was being installed", 409)
            while block := handle.read(MIB):
                self.digest.update(block)
                self.size += len(block)
        except BaseException:
            self.abort()
            raise

    def _drop(self) -> None:
        with contextlib.suppress(OSError):  # a full disk may refuse the buffer's last flush
            self.handle.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.lock.release()

    def abort(self) -> None:
        """Drop the partial version (after a write under way in another thread)."""
        with self._turn:
            self._drop()

    def commit(self) -> dict[str, Any]:
        """Verify the sha256, flush, write the manifest and publish by one rename."""
        with self._turn:
            try:
                manifest = self._publish()
            except BaseException as exc:
                self._drop()
                _raise_if_full(exc)
                raise
            self.lock.release()
        return manifest

    def _publish(self) -> dict[str, Any]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        st = os.fstat(self.handle.fileno())
        self.handle.close()
        got = self.digest.hexdigest()
        if got != self.sha256:
            raise StoreError(f"sha256 mismatch: expected {self.sha256}, got {got}", 422)
        self.store.check_allowed(got)  # the list may have changed during the transfer
        self.store._check_space(0)  # the weights are on disk now: is the margin left?
        if self.size_hint is not None and self.size != self.size_hint:
            raise StoreError(f"expected {self.size_hint} bytes, got {self.size}", 422)
        if self.store._inspect is not None:
            self.store._inspect(self.dir / MODEL_FILE)
        manifest = {
            "version": self.version,
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "installed_at": time.time(),
            "source": self.source,
            **identity(st),
        }
        atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        target = self.store.versions / self.version
        if target.exists():  # under the lock: only an install outside the store's API gets here
            raise StoreError(f"model version {self.version!r} is already installed", 409)
        self.dir.rename(target)
        fsync_dir(self.store.versions)
        return manifest


def _raise_if_full(exc: BaseException) -> None:
    """A full file system is the 507 the API answers, not a 500."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        raise StoreError(f"the store's file system is full: {exc.strerror}", 507) from None
