"""The teacher's logprobs store: round trip, damage detection, and the repair after a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.logprobs import (
    FIELD,
    LogprobsError,
    TokenLogprobs,
    append_blocks,
    read_block,
    repair,
    sidecar_path,
)


def block(tokens: int, k: int, seed: int) -> TokenLogprobs:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, 50))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logp, axis=1)[:, :k]
    return TokenLogprobs(
        top[:, 0].astype(np.int32), top.astype(np.int32), np.take_along_axis(logp, top, 1)
    )


def test_blocks_round_trip_through_their_row_references(tmp_path: Path) -> None:
    jsonl = tmp_path / "out.jsonl"
    sidecar = sidecar_path(jsonl)
    assert sidecar.name == "out.logprobs.bin"
    blocks = [block(7, 4, 1), block(3, 4, 2)]
    refs = append_blocks(sidecar, blocks)
    refs += append_blocks(sidecar, [block(5, 2, 3)])
    assert [r["offset"] for r in refs] == [0, 16 + 7 * 4 + 7 * 4 * 6, refs[1]["offset"] + 16 + 84]
    for ref, expected in zip(refs, [*blocks, block(5, 2, 3)], strict=True):
        got = read_block(jsonl, ref)
        assert (got.token_ids == expected.token_ids).all()
        assert (got.top_ids == expected.top_ids).all()
        # float16 on disk: about three significant digits.
        assert np.allclose(got.top_logprobs, expected.top_logprobs, atol=2e-3, rtol=1e-3)


def test_a_damaged_block_is_refused_with_the_file_named(tmp_path: Path) -> None:
    jsonl = tmp_path / "out.jsonl"
    sidecar = sidecar_path(jsonl)
    (ref,) = append_blocks(sidecar, [block(4, 3, 0)])
    data = bytearray(sidecar.read_bytes())
    data[-1] ^= 0xFF
    sidecar.write_bytes(bytes(data))
    with pytest.raises(LogprobsError, match=r"out\.logprobs\.bin: block at byte 0 is damaged"):
        read_block(jsonl, ref)


def test_repair_cuts_blocks_no_row_points_at(tmp_path: Path) -> None:
    sidecar = sidecar_path(tmp_path / "out.jsonl")
    kept = append_blocks(sidecar, [block(4, 3, 0), block(2, 3, 1)])
    size = sidecar.stat().st_size
    append_blocks(sidecar, [block(9, 3, 2)])  # written, then the crash: its row never was
    with sidecar.open("ab") as handle:
        handle.write(b"PDLP\x01torn")
    rows = [{"id": "a", FIELD: kept[0]}, {"id": "b", FIELD: kept[1]}, {"id": "c"}]
    assert repair(sidecar, rows) > 0
    assert sidecar.stat().st_size == size
    assert repair(sidecar, rows) == 0


def test_repair_refuses_a_file_shorter_than_its_rows(tmp_path: Path) -> None:
    sidecar = sidecar_path(tmp_path / "out.jsonl")
    (ref,) = append_blocks(sidecar, [block(4, 3, 0)])
    sidecar.write_bytes(sidecar.read_bytes()[:10])
    with pytest.raises(LogprobsError, match="rows point up to byte"):
        repair(sidecar, [{FIELD: ref}])
