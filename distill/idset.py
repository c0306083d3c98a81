"""A set of string ids in flat memory: what labelling keeps of every row it has seen.

A Python ``set`` of 100k short ids costs ~12 MiB (a str object and a table slot each), so
``distill label`` over a large file grew by that much at 100k rows. ``IdSet`` keeps a 127-bit
BLAKE2b fingerprint of each id instead, in one open-addressing table of two flat 64-bit arrays:
16 bytes a slot, the table kept at most three quarters full, ~2 MiB at 100k ids. Two different
ids share a fingerprint with a probability of about n² / 2^128 (1e-28 at a million ids): a row
is never taken for another in practice, as git trusts its object hashes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from pathlib import Path

_MIN_SLOTS = 1024
_MAX_LOAD = 0.75


def _fingerprint(value: str) -> tuple[int, int]:
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=16).digest()
    # The low word's last bit is always set: 0 marks an empty slot.
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1


class IdSet:
    """A set of strings that supports ``add``, ``update``, ``in`` and ``len`` (no iteration:
    the ids themselves are not kept)."""

    def __init__(self, values: Iterable[str] = (), expected: int = 0) -> None:
        """``expected``: how many ids will come, so that the table is made once at its size
        (a table that grows holds its old and new arrays at once while it copies)."""
        self._size = 0
        self._hi, self._lo = self._table(max(_MIN_SLOTS, int(expected / _MAX_LOAD) + 1))
        self.update(values)

    @staticmethod
    def _table(slots: int) -> tuple[array, array]:
        return array("Q", [0]) * slots, array("Q", [0]) * slots

    def _slot(self, hi: int, lo: int) -> int:
        """The slot holding this fingerprint, else the empty one where it would go."""
        slots = len(self._lo)
        i = hi % slots
        while True:
            found = self._lo[i]
            if found == 0 or (found == lo and self._hi[i] == hi):
                return i
            i = i + 1 if i + 1 < slots else 0

    def add(self, value: str) -> None:
        """Add one id (again: no change)."""
        hi, lo = _fingerprint(value)
        i = self._slot(hi, lo)
        if self._lo[i] == 0:
            self._hi[i], self._lo[i] = hi, lo
            self._size += 1
            if self._size > _MAX_LOAD * len(self._lo):
                self._grow()

    def update(self, values: Iterable[str]) -> None:
        """Add every id of ``values``."""
        for value in values:
            self.add(value)

    def _grow(self) -> None:
        old_hi, old_lo = self._hi, self._lo
        self._hi, self._lo = self._table(len(old_lo) * 3 // 2)
        for hi, lo in zip(old_hi, old_lo, strict=True):
            if lo:
                i = self._slot(hi, lo)
                self._hi[i], self._lo[i] = hi, lo

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        return self._lo[self._slot(*_fingerprint(value))] != 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes of the table (what the set costs beyond a few hundred bytes of object)."""
        return 2 * 8 * len(self._lo)


def count_lines(paths: Iterable[str | Path]) -> int:
    """Newlines in these files (missing ones count 0), read in 1 MiB blocks: how many rows an
    IdSet will see, at a few milliseconds per 100k rows."""
    total = 0
    for path in paths:
        try:
            with Path(path).open("rb") as handle:
                while block := handle.read(1 << 20):
                    total += block.count(b"\n")
        except FileNotFoundError:
            continue
    return total
