"""Fixtures of the fleet tests: the lab's image, a lab of stand-in Pis, the models to deploy
(decoder and encoder), one zram test at a time.

The image (a debootstrap root file system, cached under .cache/lab/) is made once per session and
shared by the molecule scenarios and the lab; the lab is brought up once per session and taken
down at its end, with everything it made.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import LAB, ROOT, fleet_env, make_export, require_container_tools, run

LAB_HOSTS = 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lab's modules run in ``LAB_ORDER``, then the rest of this folder (sorted stably: the
    tests of a module keep their order). Tests marked ``lab_down`` take the session's lab down:
    they run after every other test, whichever modules share the lab.

    Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) every test of this folder is
    in one group, so one worker runs them all, in this order, with one image and one lab (and
    one zram at a time), while the other worker takes the rest of the suite. The lab's tests
    wait on containers and SSH much of the time: the second worker fills that time.
    """
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]
    # The lab's modules in the order of a fleet's life (each leaves the lab as the next expects):
    # boot, site.yml, serving, faults, the canary's gate, delivery, the encoder, then the rest.
    ours = sorted((items[i] for i in slots), key=lambda item: _rank(item.path.stem))
    for i, item in zip(slots, ours, strict=True):
        item.add_marker(pytest.mark.xdist_group("lab"))
        items[i] = item
    items.sort(key=lambda item: item.get_closest_marker("lab_down") is not None)


LAB_ORDER = ("test_lab_boot", "test_lab_site", "test_lab_serving", "test_lab_faults",
             "test_lab_gate", "test_lab_delivery", "test_lab_encoder",
             "test_lab_services")  # fmt: skip


def _rank(module: str) -> int:
    return LAB_ORDER.index(module) if module in LAB_ORDER else len(LAB_ORDER)


@pytest.fixture(scope="session")
def lab_image() -> Iterator[str]:
    """The stand-in image (debootstrap once, cached; imported once per session)."""
    require_container_tools()
    image = run([sys.executable, str(LAB), "image"], timeout=1200).stdout.strip()
    yield image
    # Leave nothing behind: the lab (if any) and the image go; the rootfs tarball stays cached.
    subprocess.run([sys.executable, str(LAB), "down"], env=fleet_env(), check=False,
                   capture_output=True)  # fmt: skip


@pytest.fixture(scope="session")
def lab_image_arm64() -> Iterator[str]:
    """The arm64 stand-in image and the Pis' device trees, for molecule's arm64 scenarios (the
    root file system is built under qemu the first time, 3-7 min of CPU, then cached)."""
    require_container_tools()
    done = run([sys.executable, str(LAB), "image", "--arch", "arm64"], timeout=3600)
    yield done.stdout.strip()
    subprocess.run([sys.executable, str(LAB), "down"], env=fleet_env(), check=False,
                   capture_output=True)  # fmt: skip


@pytest.fixture(scope="session")
def lab(lab_image: str) -> Iterator[Path]:
    """Three stand-in Pis (a canary and two more), up for the session; yields the inventory."""
    done = run([sys.executable, str(LAB), "up", "--hosts", str(LAB_HOSTS)], timeout=600)
    assert f"{LAB_HOSTS} stand-in Pi(s) up" in done.stdout
    yield ROOT / "inventory" / "lab.yml"
    subprocess.run([sys.executable, str(LAB), "down", "--keep-image"], env=fleet_env(),
                   check=False, capture_output=True)  # fmt: skip


@pytest.fixture
def zram_lock() -> Iterator[None]:
    """zram and swap are not namespaced: one zram test at a time, across processes."""
    lock = ROOT / ".cache" / "zram-test.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def student_export(tmp_path_factory: pytest.TempPathFactory, pi_agent_tiny_gguf: Path) -> Path:
    """The tiny test model as a fake student export (distill export's layout and manifest)."""
    return make_export(tmp_path_factory.mktemp("student") / "dist", pi_agent_tiny_gguf.read_bytes())


@pytest.fixture(scope="session")
def encoder_export(tmp_path_factory: pytest.TempPathFactory, pi_agent_encoder_gguf: Path) -> Path:
    """The embedded MiniLM's GGUF as an encoder export (distill export's layout, kind encoder)."""
    weights = pi_agent_encoder_gguf.read_bytes()
    out = tmp_path_factory.mktemp("encoder") / "dist"
    return make_export(out, weights, name="minilm", kind="encoder")


@pytest.fixture(scope="session")
def corrupt_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A broken model whose checksums are right: it reaches the canary, llama-server refuses it."""
    weights = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 16
    return make_export(tmp_path_factory.mktemp("corrupt") / "dist", weights)
