"""The throughput regressor and the gate."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pi_agent.regressor import Observation, Regressor, gate, read_history, read_reference


def test_reference_table_has_both_boards_and_both_tests() -> None:
    rows = read_reference()
    assert {(r.board, r.test) for r in rows} == {
        ("pi4", "pp"),
        ("pi4", "tg"),
        ("pi5", "pp"),
        ("pi5", "tg"),
    }


def test_predictions_follow_the_reference_and_its_shape() -> None:
    reg = Regressor(read_reference())
    smol = reg.predict("pi5", 134515008, "Q4_1", 4, "tg")
    assert smol == pytest.approx(60, rel=0.35)
    assert reg.predict("pi4", 134515008, "Q4_1", 4, "tg") < smol  # a Pi 4 is slower
    assert reg.predict("pi5", 1100048384, "Q4_0", 4, "tg") < smol  # a bigger model is slower
    assert reg.predict("pi5", 134515008, "Q8_0", 4, "tg") < smol  # more bits, slower
    assert reg.predict("pi5", 134515008, "Q4_1", 1, "tg") < smol  # fewer threads, slower
    assert reg.predict("x86", 134515008, "Q4_1", 4, "tg") is None


def test_fleet_history_pulls_the_prediction(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, ["board", "model_n_params", "quant", "n_threads", "test_kind", "avg_ts"]
        )
        writer.writeheader()
        for _ in range(5):
            writer.writerow(
                {
                    "board": "pi5",
                    "model_n_params": 134515008,
                    "quant": "Q4_1",
                    "n_threads": 4,
                    "test_kind": "tg",
                    "avg_ts": 120.0,
                }
            )
    history = read_history([path])
    assert len(history) == 5 and history[0].source.startswith("history")
    base = Regressor(read_reference()).predict("pi5", 134515008, "Q4_1", 4, "tg")
    pulled = Regressor(read_reference() + history).predict("pi5", 134515008, "Q4_1", 4, "tg")
    assert pulled > base * 1.3


def test_a_few_rows_still_fit() -> None:
    reg = Regressor([Observation("pi4", 10**8, "Q4_0", 4, "tg", 30.0)])
    assert reg.predict("pi4", 10**8, "Q4_0", 4, "tg") == pytest.approx(30.0, rel=0.2)


def test_gate_fails_below_the_tolerance_only() -> None:
    rows = [{"test": "tg64", "threads": 4, "tokens_per_second": 70.0, "predicted": 100.0}]
    assert gate(rows, 0.35)["passed"]
    failed = gate(rows, 0.25)
    assert not failed["passed"] and "tg64" in failed["failures"][0]
    unknown = gate(
        [{"test": "tg64", "threads": 4, "tokens_per_second": 1.0, "predicted": None}], 0.1
    )
    assert unknown["passed"] and unknown["checked"] == 0
