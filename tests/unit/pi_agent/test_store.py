"""The model store: install verified by sha256, atomic switch, keep N, free-space margin, and a
switch killed with SIGKILL at random points that always leaves an intact model active."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pi_agent.store import ModelStore, StoreError


def blob(tag: str, size: int = 4096) -> bytes:
    return (tag.encode() * (size // len(tag) + 1))[:size]


def install(store: ModelStore, version: str, data: bytes) -> dict:
    return store.install(version, [data[:100], data[100:]], hashlib.sha256(data).hexdigest())


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "models", keep=2)
    s.recover()
    return s


def test_install_verifies_the_sha256_and_leaves_nothing_on_mismatch(store: ModelStore) -> None:
    with pytest.raises(StoreError) as err:
        store.install("v1", [b"abc"], "0" * 64)
    assert err.value.status == 422
    assert store.list() == []
    assert list(store.versions.iterdir()) == []


def test_switch_rollback_and_previous(store: ModelStore) -> None:
    install(store, "v1", blob("one"))
    install(store, "v2", blob("two"))
    assert store.active() is None
    store.switch("v1")
    assert store.switch("v2") == "v1"
    assert store.active_model().read_bytes() == blob("two")
    assert store.previous_version() == "v1"
    assert store.rollback() == "v1"
    assert store.active_model().read_bytes() == blob("one")
    assert store.previous_version() == "v2"


def test_prune_keeps_n_versions_but_never_active_or_previous(store: ModelStore) -> None:
    for i in range(4):
        install(store, f"v{i}", blob(f"m{i}"))
    store.switch("v0")
    store.switch("v1")
    removed = store.prune()
    assert removed == ["v2", "v3"]
    assert [m["version"] for m in store.list()] == ["v0", "v1"]


def test_in_use_versions_cannot_be_removed(store: ModelStore) -> None:
    install(store, "v1", blob("one"))
    store.switch("v1")
    with pytest.raises(StoreError) as err:
        store.remove("v1")
    assert err.value.status == 409


def test_a_corrupt_version_is_refused_at_switch(store: ModelStore) -> None:
    install(store, "v1", blob("one"))
    (store.versions / "v1" / "model.gguf").write_bytes(blob("bad"))
    with pytest.raises(StoreError, match="corrupt"):
        store.switch("v1")
    assert store.active() is None


def test_install_refused_below_the_free_space_margin(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "models", margin_bytes=0)
    s.recover()
    install(s, "v0", blob("zero"))  # no margin: accepted
    s.margin_bytes = s.free_bytes() + (1 << 30)  # any install would leave less than the margin
    with pytest.raises(StoreError) as err:
        install(s, "v1", blob("one"))
    assert err.value.status == 507
    assert [m["version"] for m in s.list()] == ["v0"]


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a/b", "x" * 65, "rollback", "v1\n"])
def test_bad_version_names_are_refused(store: ModelStore, name: str) -> None:
    with pytest.raises(StoreError) as err:
        install(store, name, blob("one"))
    assert err.value.status == 400


def test_recover_sweeps_interrupted_installs_and_switches(store: ModelStore) -> None:
    (store.versions / ".incoming-v9-123").mkdir()
    (store.root / ".current.tmp-123").symlink_to("versions/v9")
    store.recover()
    assert not (store.versions / ".incoming-v9-123").exists()
    assert not (store.root / ".current.tmp-123").is_symlink()


SWITCHER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from pi_agent.store import ModelStore
    store = ModelStore(Path(sys.argv[1]), keep=3)
    store.recover()
    print("go", flush=True)
    n = 0
    while True:  # switch back and forth, installing and pruning, until killed
        n += 1
        data = (b"new%d" % n) * 2000
        store.install(f"n{n}", [data], hashlib.sha256(data).hexdigest())
        store.switch(f"n{n}")
        store.prune()
        store.switch("old", verify=False)
        store.switch(f"n{n}", verify=False)
    """
)


@pytest.mark.slow
def test_switch_killed_at_random_points_always_leaves_an_intact_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, keep=3)
    store.recover()
    install(store, "old", blob("old", 8000))
    store.switch("old")
    rng = random.Random(4)
    seen = set()
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", SWITCHER, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0, 0.05))  # the kill point, chosen at random
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        fresh = ModelStore(root, keep=3)
        fresh.recover()  # what the agent does at start
        active = fresh.active()
        assert active is not None, "no active model after a kill"
        manifest = fresh.verify(active)  # weights present, sha256 intact
        assert fresh.active_model().stat().st_size == manifest["size"]
        seen.add("old" if active == "old" else "new")
    assert seen  # at least one kill observed a state (both usually are)


@pytest.fixture
def fed(tmp_path: Path) -> ModelStore:
    """A store with an incoming folder, as the agent makes it."""
    s = ModelStore(tmp_path / "models", keep=2, incoming_dir=tmp_path / "incoming")
    s.recover()
    return s


def drop(store: ModelStore, name: str, data: bytes) -> Path:
    assert store.incoming_dir is not None
    path = store.incoming_dir / name
    path.write_bytes(data)
    return path


def test_recover_makes_the_incoming_folder_group_writable(fed: ModelStore) -> None:
    assert fed.incoming_dir is not None
    assert fed.incoming_dir.is_dir() and fed.incoming_dir.stat().st_mode & 0o777 == 0o770


def test_install_path_moves_the_file_in_by_rename(fed: ModelStore) -> None:
    data = blob("peer", 3 * 1024 * 1024 + 5)
    path = drop(fed, "model.gguf", data)
    inode = path.stat().st_ino
    manifest = fed.install_path("p1", path, hashlib.sha256(data).hexdigest(), name="demo")
    assert not path.exists()
    model = fed.versions / "p1" / "model.gguf"
    assert model.stat().st_ino == inode  # the same file: renamed, not copied
    assert model.read_bytes() == data
    assert manifest["size"] == len(data) and manifest["name"] == "demo"
    assert fed.verify("p1")["sha256"] == hashlib.sha256(data).hexdigest()
    assert [m["version"] for m in fed.list()] == ["p1"]


def test_install_path_with_a_wrong_sha256_removes_the_file(fed: ModelStore) -> None:
    path = drop(fed, "model.gguf", blob("peer"))
    with pytest.raises(StoreError, match="sha256 mismatch") as err:
        fed.install_path("p1", path, "0" * 64)
    assert err.value.status == 422
    assert not path.exists()
    assert fed.list() == [] and list(fed.versions.iterdir()) == []


def test_install_path_refuses_what_is_not_a_plain_file_of_the_incoming_folder(
    fed: ModelStore, tmp_path: Path
) -> None:
    assert fed.incoming_dir is not None
    data = blob("peer")
    sha = hashlib.sha256(data).hexdigest()
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(data)
    (fed.incoming_dir / "sub").mkdir()
    nested = drop(fed, "sub/model.gguf", data)
    link = fed.incoming_dir / "link.gguf"
    link.symlink_to(outside)
    hard = fed.incoming_dir / "hard.gguf"
    hard.hardlink_to(outside)
    fifo = fed.incoming_dir / "fifo.gguf"
    os.mkfifo(fifo)
    cases = {
        outside: "not directly inside",
        fed.incoming_dir / ".." / "outside.gguf": "not directly inside",
        nested: "not directly inside",
        Path("model.gguf"): "absolute",
        link: "symlink",
        hard: "hard links",
        fifo: "not a regular file",
        fed.incoming_dir / "sub": "not a regular file",
        fed.incoming_dir / "missing.gguf": "No such file",
    }
    for path, message in cases.items():
        with pytest.raises(StoreError, match=message) as err:
            fed.install_path("p1", path, sha)
        assert err.value.status == 400, path
    assert outside.read_bytes() == data and nested.read_bytes() == data and link.is_symlink()
    assert fed.list() == []


def test_install_path_keeps_the_file_when_the_install_is_refused(fed: ModelStore) -> None:
    data = blob("peer")
    sha = hashlib.sha256(data).hexdigest()
    install(fed, "p1", blob("other"))
    path = drop(fed, "model.gguf", data)
    for version, status in (("p1", 409), ("../x", 400)):
        with pytest.raises(StoreError) as err:
            fed.install_path(version, path, sha)
        assert err.value.status == status
    fed.margin_bytes = fed.free_bytes() + (1 << 30)
    with pytest.raises(StoreError) as err:
        fed.install_path("p2", path, sha)
    assert err.value.status == 507
    assert path.read_bytes() == data  # still there for another try
    assert [m["version"] for m in fed.list()] == ["p1"]


def test_open_blob_finds_the_weights_by_sha256(fed: ModelStore) -> None:
    data = blob("one")
    install(fed, "v1", data)
    with fed.open_blob(hashlib.sha256(data).hexdigest()) as handle:
        assert handle.read() == data
    with pytest.raises(StoreError) as err:
        fed.open_blob("0" * 64)
    assert err.value.status == 404


def rewrite_later(path: Path, data: bytes, since: int) -> None:
    """Write ``data`` as ``path`` once the clock has left ``since`` (an mtime) behind: file times
    tick in milliseconds."""
    while time.time_ns() < since + 20_000_000:
        time.sleep(0.005)
    path.write_bytes(data)


def test_open_blob_refuses_weights_changed_in_place(fed: ModelStore) -> None:
    data = blob("one")
    install(fed, "v1", data)
    model = fed.versions / "v1" / "model.gguf"
    rewrite_later(model, blob("two"), model.stat().st_mtime_ns)  # the same size
    with pytest.raises(StoreError) as err:
        fed.open_blob(hashlib.sha256(data).hexdigest())
    assert err.value.status == 404


def test_open_blob_rehashes_weights_copied_back_and_records_them(fed: ModelStore) -> None:
    data = blob("one")
    installed = install(fed, "v1", data)
    model = fed.versions / "v1" / "model.gguf"
    since = model.stat().st_mtime_ns
    model.unlink()  # as a restore from a backup: a new file, the same bytes
    rewrite_later(model, data, since)
    with fed.open_blob(hashlib.sha256(data).hexdigest()) as handle:
        assert handle.read() == data
    recorded = fed.manifest("v1")
    assert (recorded["inode"], recorded["mtime_ns"]) == (
        model.stat().st_ino,
        model.stat().st_mtime_ns,
    )
    assert recorded["sha256"] == installed["sha256"] and "active" not in recorded


def test_an_install_waits_for_another_of_the_same_version(store: ModelStore) -> None:
    data = blob("one")
    first = store.begin("v1", hashlib.sha256(data).hexdigest())
    first.write(data)
    with pytest.raises(StoreError, match="still running") as err:
        store.begin("v1", hashlib.sha256(data).hexdigest(), wait=0.2)
    assert err.value.status == 409
    first.commit()
    with pytest.raises(StoreError, match="already installed"):
        store.begin("v1", hashlib.sha256(data).hexdigest(), wait=0.2)
    assert store.verify("v1")["size"] == len(data)
    assert not list(store.versions.glob(".*"))  # no temporary directory, no lock file left


def test_a_long_display_name_is_refused(store: ModelStore) -> None:
    data = blob("one")
    with pytest.raises(StoreError, match="longer than 128") as err:
        store.install("v1", [data], hashlib.sha256(data).hexdigest(), name="n" * 129)
    assert err.value.status == 400
    assert install(store, "v2", data)["name"] == "v2"
