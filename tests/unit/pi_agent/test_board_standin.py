"""Boards as the arm64 stand-ins show them (issue 12): a container's own /proc has no device
tree, so scripts/lab.py binds a Pi's ``model`` and ``compatible`` at /sys/firmware, where
/proc/device-tree points on a Pi. The agent reads either, and the regressor expects numbers
for both boards it names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pi_agent.host import Host
from pi_agent.regressor import Regressor, read_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from lab_arch import BOARDS, board_tree


@pytest.mark.parametrize("board", ["pi4", "pi5"])
def test_a_stand_in_s_bound_device_tree_names_its_board(tmp_path: Path, board: str) -> None:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)  # a container's /proc: no device-tree in it
    (root / "sys").mkdir()
    tree = board_tree(board, tmp_path / "cache")
    (root / "sys" / "firmware").symlink_to(tree)  # what the bind mount shows
    host = Host(root)
    assert host.board_model() == BOARDS[board].model
    assert host.board() == board
    compatible = (root / "sys/firmware/devicetree/base/compatible").read_bytes()
    assert compatible.split(b"\0")[:2] == [c.encode() for c in BOARDS[board].compatible]


def test_the_proc_device_tree_wins_where_both_are_there(tmp_path: Path) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    (tmp_path / "sys/firmware").parent.mkdir(parents=True)
    (tmp_path / "sys/firmware").symlink_to(board_tree("pi4", tmp_path / "cache"))
    assert Host(tmp_path).board() == "pi5"


def test_no_device_tree_anywhere_is_an_unknown_board(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    assert Host(tmp_path).board() == "unknown"


@pytest.mark.parametrize("board", ["pi4", "pi5"])
def test_the_regressor_expects_throughput_on_either_board(board: str) -> None:
    regressor = Regressor(read_reference())
    for test in ("pp", "tg"):
        predicted = regressor.predict(board, 135_000_000, "Q8_0", 4, test)
        assert predicted is not None and predicted > 0
