"""``IdSet`` against Python's own set: the same answers for added, repeated and absent ids,
through its table's growth, in a fraction of the memory."""

from __future__ import annotations

import random
import tracemalloc

from distill.idset import IdSet, count_lines


def test_it_answers_as_a_set_does_through_growth() -> None:
    rng = random.Random(0)
    ids = [f"row-{rng.getrandbits(64):016x}" for _ in range(5000)] + ["", "é", "row-1"]
    ours, theirs = IdSet(), set()
    for value in ids + ids[:100]:  # repeats change nothing
        assert (value in ours) == (value in theirs)
        ours.add(value)
        theirs.add(value)
    assert len(ours) == len(theirs) == len(set(ids))
    assert all(value in ours for value in ids)
    absent = [f"row-{rng.getrandbits(64):016x}" for _ in range(5000)]
    assert not any(value in ours for value in absent if value not in theirs)
    assert 1 not in ours  # not a str: never in it


def test_ids_that_differ_by_one_character_are_told_apart() -> None:
    ours = IdSet(["a1", "a2"])
    assert "a1" in ours and "a2" in ours and "a3" not in ours and len(ours) == 2


def test_a_hundred_thousand_ids_take_a_fraction_of_a_sets_memory() -> None:
    # As when reading a file: each id is a new string, which a set keeps and IdSet does not.
    tracemalloc.start()
    try:
        ours = IdSet(f"row-{i:016x}" for i in range(100_000))
        ours_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        theirs = {f"row-{i:016x}" for i in range(100_000)}
        theirs_size = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(ours) == len(theirs) == 100_000
    assert ours_peak < theirs_size / 2, (ours_peak, theirs_size)
    assert ours.nbytes < 16 * 100_000 / 0.75 * 1.5 + 16 * 1024


def test_a_table_made_at_its_expected_size_never_grows(tmp_path) -> None:
    ours = IdSet(expected=10_000)
    before = ours.nbytes
    ours.update(f"id-{i}" for i in range(10_000))
    assert ours.nbytes == before and len(ours) == 10_000
    ours.update(f"more-{i}" for i in range(5_000))  # more than expected: it grows all the same
    assert ours.nbytes > before and all(f"more-{i}" in ours for i in range(5_000))


def test_count_lines_counts_newlines_and_skips_missing_files(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"{}\n" * 3 + b"x" * (3 << 20) + b"\n")
    assert count_lines([tmp_path / "a.jsonl", tmp_path / "absent.jsonl"]) == 4
