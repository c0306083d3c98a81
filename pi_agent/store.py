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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from pi_agent.fsutil import atomic_symlink, atomic_write, fsync_dir, sha256_file

VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MODEL_FILE = "model.gguf"
MANIFEST = "manifest.json"
MIB = 1 << 20


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
    ) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.current = self.root / "current"
        self.previous = self.root / "previous"
        self.keep = keep
        self.margin_bytes = margin_bytes
        self.incoming_dir = Path(incoming_dir) if incoming_dir is not None else None

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

        The open file stays whole even if the version is removed while it is being read.
        """
        for manifest in self.list():
            if manifest["sha256"] != sha256:
                continue
            try:
                handle = (self.versions / manifest["version"] / MODEL_FILE).open("rb")
            except OSError:
                continue  # removed since it was listed
            if os.fstat(handle.fileno()).st_size == manifest["size"]:
                return handle
            handle.close()
        raise StoreError(f"no installed model has sha256 {sha256}", 404)

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
    ) -> Incoming:
        """Start writing a version (every check that can fail early fails here)."""
        self._check_name(version)
        sha256 = sha256.lower() if isinstance(sha256, str) else ""
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError("sha256 must be 64 hex digits", 400)
        if (self.versions / version).exists():
            raise StoreError(f"model version {version!r} is already installed", 409)
        if size_hint is not None:
            self._check_space(size_hint)
        self.versions.mkdir(parents=True, exist_ok=True)
        return Incoming(self, version, sha256, name or version, size_hint, source)

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

    def install_url(
        self, version: str, url: str, sha256: str, name: str = "", timeout: float = 600.0
    ) -> dict[str, Any]:
        """Download a version over http(s), verified by sha256 (blocking: run it in a thread)."""
        import http.client
        import urllib.error
        import urllib.request

        if not url.startswith(("http://", "https://")):
            raise StoreError("url must be http:// or https://", 400)
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise StoreError(f"cannot download {url!r}: {exc}", 502) from None
        with response:
            length = response.headers.get("Content-Length")
            size_hint = int(length) if length and length.isdigit() else None

            def read() -> Iterable[bytes]:
                try:
                    while block := response.read(MIB):
                        yield block
                except (OSError, http.client.HTTPException) as exc:
                    raise StoreError(f"download of {url!r} failed: {exc}", 502) from None

            return self.install(version, read(), sha256, name, size_hint, source=url)

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
        trash = self.versions / f".incoming-removed-{version}-{os.getpid()}"
        (self.versions / version).rename(trash)
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


class Incoming:
    """A version being written under ``versions/.incoming-*``; ``commit`` publishes it."""

    def __init__(
        self,
        store: ModelStore,
        version: str,
        sha256: str,
        name: str,
        size_hint: int | None,
        source: str,
    ) -> None:
        self.store = store
        self.version = version
        self.sha256 = sha256
        self.name = name
        self.size_hint = size_hint
        self.source = source
        self.size = 0
        self.digest = hashlib.sha256()
        self.dir = store.versions / f".incoming-{version}-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()
        self.handle = (self.dir / MODEL_FILE).open("wb")

    def write(self, chunk: bytes) -> None:
        """Append a chunk (keeping the free-space margin when the size was not announced)."""
        try:
            self.handle.write(chunk)
            self.digest.update(chunk)
            self.size += len(chunk)
            before = self.size - len(chunk)
            if self.size_hint is None and (
                before == 0 or before // (64 * MIB) != self.size // (64 * MIB)
            ):
                self.store._check_space(0)
        except BaseException:
            self.abort()
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

    def abort(self) -> None:
        """Drop the partial version."""
        self.handle.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self) -> dict[str, Any]:
        """Verify the sha256, flush, write the manifest and publish by one rename."""
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            got = self.digest.hexdigest()
            if got != self.sha256:
                raise StoreError(f"sha256 mismatch: expected {self.sha256}, got {got}", 422)
            self.store._check_space(0)  # the weights are on disk now: is the margin left?
            if self.size_hint is not None and self.size != self.size_hint:
                raise StoreError(f"expected {self.size_hint} bytes, got {self.size}", 422)
            manifest = {
                "version": self.version,
                "name": self.name,
                "sha256": self.sha256,
                "size": self.size,
                "installed_at": time.time(),
                "source": self.source,
            }
            atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            target = self.store.versions / self.version
            if target.exists():
                raise StoreError(f"model version {self.version!r} is already installed", 409)
            self.dir.rename(target)
            fsync_dir(self.store.versions)
        except BaseException:
            self.abort()
            raise
        return manifest
