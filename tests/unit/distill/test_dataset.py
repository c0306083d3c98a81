"""The sample data shipped in dataset/: valid, big enough, with a fixed held-out split."""

from __future__ import annotations

from collections import Counter

from distill.records import read_many, read_records


def test_the_sample_files_validate_and_hold_at_least_150_rows(sample_files) -> None:
    rows = read_many(sample_files)
    assert len(rows) >= 150
    distill, conversation = (read_records(path) for path in sample_files)
    assert sum(r.requires_json for r in distill) >= 30
    assert all(r.json_schema for r in distill if r.requires_json)
    assert all(r.id.startswith("qd-") for r in distill)
    assert all(r.id.startswith("qc-") for r in conversation)


def test_the_held_out_split_is_fixed_and_covers_json_rows(sample_files) -> None:
    rows = read_many(sample_files)
    heldout = [r for r in rows if r.split == "heldout"]
    assert 0.1 <= len(heldout) / len(rows) <= 0.2
    assert sum(r.requires_json for r in heldout) >= 6
    # The rule the dataset README states: a row is held out when its number divides by 7.
    assert all((int(r.id[3:]) % 7 == 0) == (r.split == "heldout") for r in rows)


def test_every_row_carries_register_dialect_and_provenance(sample_files) -> None:
    rows = read_many(sample_files)
    registers = Counter(r.metadata["register"] for r in rows)
    assert set(registers) == {"familier", "neutre", "soutenu"}
    assert Counter(r.metadata["dialect"] for r in rows).most_common(1)[0][0] == "québécois"
    assert all(r.metadata["provenance"]["license"] == "CC0-1.0" for r in rows)


def test_the_conversation_file_holds_short_multi_turn_dialogues(sample_files) -> None:
    distill, conversation = (read_records(path) for path in sample_files)
    talks = [r for r in conversation if r.history]
    assert len(talks) >= 24
    assert {r.turns for r in talks} >= {2, 3}
    assert any(r.requires_json for r in talks) and any(r.split == "heldout" for r in talks)
    # Short turns keep make demo's labelling time; the instructions file stays single-turn.
    assert max(len(t["content"].split()) for r in talks for t in r.history) <= 20
    assert not any(r.history for r in distill)
