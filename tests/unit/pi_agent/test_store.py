"""The model store: install verified by sha256, atomic switch, keep N, free-space margin, and a
switch killed with SIGKILL at random points that always leaves an intact model active."""

from __future__ import annotations

import hashlib
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
