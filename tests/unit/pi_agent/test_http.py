"""Byte ranges as RFC 9110 reads them: one range served, the rest ignored or refused with 416."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pi_agent.http import HTTPError, byte_range


@dataclass(frozen=True)
class Case:
    header: str | None
    size: int
    expected: tuple[int, int] | None


CASES = {
    "no header: the whole file": Case(None, 1000, None),
    "first and last byte": Case("bytes=0-99", 1000, (0, 99)),
    "one byte": Case("bytes=10-10", 1000, (10, 10)),
    "from a byte to the end": Case("bytes=900-", 1000, (900, 999)),
    "the last n bytes": Case("bytes=-100", 1000, (900, 999)),
    "a suffix longer than the file is the whole file": Case("bytes=-5000", 1000, (0, 999)),
    "an end past the file is clamped": Case("bytes=990-5000", 1000, (990, 999)),
    "a huge end is clamped": Case("bytes=1-" + "9" * 40, 1000, (1, 999)),
    "the unit is case-insensitive": Case("Bytes=1-2", 1000, (1, 2)),
    "several ranges: the whole file": Case("bytes=0-1,5-6", 1000, None),
    "an end before the start is ignored": Case("bytes=5-3", 1000, None),
    "another unit is ignored": Case("items=0-1", 1000, None),
    "garbage is ignored": Case("bytes=a-b", 1000, None),
    "no numbers is ignored": Case("bytes=-", 1000, None),
    "an empty file is served whole": Case("bytes=0-10", 0, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_byte_range(case: Case) -> None:
    assert byte_range(case.header, case.size) == case.expected


@pytest.mark.parametrize(
    "header",
    ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=" + "9" * 40 + "-"],
    ids=["start at the size", "start past the size", "empty suffix", "huge start"],
)
def test_unsatisfiable_ranges_are_416_with_the_size(header: str) -> None:
    with pytest.raises(HTTPError) as err:
        byte_range(header, 1000)
    assert err.value.status == 416
    assert err.value.headers == {"Content-Range": "bytes */1000"}
