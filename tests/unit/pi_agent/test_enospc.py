"""The store's file system misbehaving under an upload, on real file systems: full (a 1 MiB
tmpfs: ENOSPC is a 507 and nothing half-written stays) and frozen (``fsfreeze`` on a loop ext4:
writes block as on a stalled SD card, and the agent still answers /healthz)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pi_agent.store import ModelStore, StoreError
from pi_agent.testing import AgentProcess

CONFIG = {"decoder": {"enabled": False}, "store": {"free_space_margin_mib": 0}}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def mounted(where: Path, *mount_args: str | Path) -> Iterator[Path]:
    """``mount <mount_args> <where>``, unmounted afterwards; skips where mounting is refused."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    done = run("mount", *mount_args, where)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(map(str, mount_args))} refused: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if run("umount", where).returncode != 0:
            run("umount", "-l", where)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    with mounted(where, "-t", "tmpfs", "-o", f"size={size}", "tmpfs") as path:
        yield path


@contextlib.contextmanager
def loop_ext4(where: Path, image: Path, mib: int) -> Iterator[Path]:
    if not (shutil.which("mkfs.ext4") and shutil.which("fsfreeze")):
        pytest.skip("needs mkfs.ext4 and fsfreeze (util-linux)")
    with image.open("wb") as handle:
        handle.truncate(mib << 20)
    assert run("mkfs.ext4", "-q", "-F", image).returncode == 0
    with mounted(where, "-o", "loop", image) as path:
        yield path


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system (a file, written until ENOSPC)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_store_is_507_and_keeps_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "models", "1m") as root:
        store = ModelStore(root)
        store.recover()
        data = os.urandom(3 << 20)
        chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))  # no size announced
        with pytest.raises(StoreError, match="full") as err:
            store.install("v1", chunks, hashlib.sha256(data).hexdigest())
        assert err.value.status == 507
        assert list(store.versions.iterdir()) == [] and store.list() == []


def test_an_upload_that_fills_the_disk_is_507_and_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with tmpfs(state / "models", "1m") as models, AgentProcess(tmp_path, CONFIG) as agent:
        data = os.urandom(600 * 1024)  # fits when it starts
        sha = hashlib.sha256(data).hexdigest()
        upload = agent.upload("v1", len(data), sha)
        upload.send(data[: 300 * 1024])
        versions = models / "versions"
        agent.wait_for(lambda: any(d.iterdir() for d in versions.glob(".incoming-*")))
        filler = fill(models)  # another writer takes the rest meanwhile
        upload.send(data[300 * 1024 :])
        status, body = upload.response()
        assert status == 507, body
        assert "full" in body["error"]["message"]
        assert not [p.name for p in versions.iterdir()]  # no partial version, no lock file
        assert agent.json("GET", "/v1/models/v1")[0] == 404
        filler.unlink()
        again = agent.upload("v1", len(data), sha)
        again.send(data)
        assert again.response()[0] == 201
        assert ModelStore(models).verify("v1")["size"] == len(data)


def test_healthz_answers_while_an_upload_waits_on_a_frozen_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    image = tmp_path / "models.img"
    with loop_ext4(state / "models", image, 48) as models, AgentProcess(tmp_path, CONFIG) as agent:
        data = os.urandom(8 << 20)
        sha = hashlib.sha256(data).hexdigest()
        upload = agent.upload("v1", len(data), sha)
        upload.send(data[: 2 << 20])
        versions = models / "versions"

        def written() -> int:
            return sum(f.stat().st_size for f in versions.glob(".incoming-*/*"))

        agent.wait_for(lambda: written() >= 1 << 20)
        assert run("fsfreeze", "-f", models).returncode == 0
        try:  # every write now blocks until the thaw, as on a stalled card
            sender = threading.Thread(target=upload.send, args=(data[2 << 20 : 4 << 20],))
            sender.start()
            time.sleep(0.3)  # the upload's next writes are blocked by now
            started = time.monotonic()
            status, _, _ = agent.request("GET", "/healthz", auth=False, timeout=5)
            took = time.monotonic() - started
        finally:
            run("fsfreeze", "-u", models)
        assert status == 200 and took < 1.0, took
        sender.join(30)
        upload.send(data[4 << 20 :])
        assert upload.response()[0] == 201
        assert ModelStore(models).verify("v1")["sha256"] == sha
