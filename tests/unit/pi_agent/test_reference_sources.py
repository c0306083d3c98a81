"""The regressor's packaged reference rows (issue 12, section 4): each names its source (a
published result's address) or says it is an estimate, and both Pi boards have both tests."""

from __future__ import annotations

from pi_agent.regressor import read_reference


def test_every_reference_row_names_its_source_or_is_an_estimate() -> None:
    rows = read_reference()
    assert rows
    unsourced = [r for r in rows if r.source != "estimate" and not r.source.startswith("https://")]
    assert not unsourced, unsourced


def test_the_reference_covers_the_lab_s_pi_4_and_pi_5() -> None:
    seen = {(r.board, r.test) for r in read_reference()}
    assert {("pi4", "pp"), ("pi4", "tg"), ("pi5", "pp"), ("pi5", "tg")} <= seen
