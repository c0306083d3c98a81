"""Which process this is under a launcher, and the helpers that do nothing in a single one.

Two real processes train in ``tests/integration/test_train_multiprocess.py``.
"""

from __future__ import annotations

import pytest

from distill.train.device import pick_device
from distill.train.ranks import Ranks, from_main, main_first, ranks


def test_ranks_come_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    here = ranks()
    assert here == Ranks(rank=3, world_size=4, local_rank=1)
    assert here.distributed and not here.main


def test_without_a_launcher_this_is_the_only_and_main_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    here = ranks()
    assert here.main and not here.distributed
    ran = []
    with main_first():
        ran.append(True)
    assert ran == [True]
    assert from_main((8, 0.5)) == (8, 0.5)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU needed to pick one
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pick_device("auto") == "cuda"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == "cuda:1"
    assert pick_device("cuda") == "cuda:1"
    assert pick_device("cuda:0") == "cuda:0"  # a device named in full is taken as said
    assert pick_device("cpu") == "cpu"
