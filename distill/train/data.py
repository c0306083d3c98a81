"""Training data beyond :mod:`distill.encoding`: packing, batches, the run record's data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from distill.encoding import IGNORE_INDEX, Example
from distill.records import Record

IGNORE_TARGET = -1  # teacher_ids at a position (or slot) with no teacher candidate


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """First-fit-decreasing bins of whole examples, each bin at most ``max_length`` tokens."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for index, free in enumerate(room):
            if size <= free:
                bins[index].append(example)
                room[index] -= size
                break
        else:
            bins.append([example])
            room.append(max_length - size)
    return bins


class Collator:
    """Batches of examples (padded, with an attention mask) or of packed bins.

    A packed row carries ``position_ids`` that restart at each example and no attention mask:
    transformers then builds a block-diagonal causal mask, so rows never see each other. With
    ``teacher`` on, the batch also carries ``teacher_ids`` and ``teacher_logprobs`` [B, L, K] at
    the positions of the tokens they describe (as ``labels``; the loss shifts both), ids -1 where
    a position has no target (prompt, padding, a row without log-probabilities, slots past K).
    """

    def __init__(self, pad_id: int, packed: bool, multiple_of: int = 1, teacher: bool = False):
        self.pad_id = pad_id
        self.packed = packed
        self.multiple_of = multiple_of
        self.teacher = teacher

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        import torch

        groups = [item if self.packed else [item] for item in items]
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for group in groups:
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for example in group:
                ids += example.input_ids
                labels += example.labels
                positions += list(range(len(example.input_ids)))
            rows.append((ids, labels, positions))
        width = max(len(r[0]) for r in rows)
        width = -(-width // self.multiple_of) * self.multiple_of
        batch_ids, batch_labels, batch_pos, batch_mask = [], [], [], []
        for ids, labels, positions in rows:
            pad = width - len(ids)
            batch_ids.append(ids + [self.pad_id] * pad)
            batch_labels.append(labels + [IGNORE_INDEX] * pad)
            batch_pos.append(positions + list(range(pad)))
            batch_mask.append([1] * len(ids) + [0] * pad)
        out = {
            "input_ids": torch.tensor(batch_ids),
            "labels": torch.tensor(batch_labels),
        }
        if self.packed:
            out["position_ids"] = torch.tensor(batch_pos)
        else:
            out["attention_mask"] = torch.tensor(batch_mask)
        if self.teacher:
            out.update(self._teacher(groups, width))
        return out

    @staticmethod
    def _teacher(groups: list[list[Any]], width: int) -> dict[str, Any]:
        import torch

        targets = [getattr(e, "teacher", None) for group in groups for e in group]
        k = max((t.top_ids.shape[1] for t in targets if t is not None), default=1)
        top_ids = torch.full((len(groups), width, k), IGNORE_TARGET, dtype=torch.int32)
        top_logprobs = torch.zeros((len(groups), width, k), dtype=torch.float32)
        for row, group in enumerate(groups):
            offset = 0
            for example in group:
                target = getattr(example, "teacher", None)
                if target is not None:
                    start = offset + target.start
                    end = start + target.top_ids.shape[0]
                    kk = target.top_ids.shape[1]
                    top_ids[row, start:end, :kk] = torch.from_numpy(target.top_ids)
                    top_logprobs[row, start:end, :kk] = torch.from_numpy(target.top_logprobs)
                offset += len(example.input_ids)
        return {"teacher_ids": top_ids, "teacher_logprobs": top_logprobs}


class LengthBatches:
    """Row indices in batches of rows of about the same length, the batches in a drawn order.

    Random batches of conversations padded the demo's rows to 1.5x their tokens; rows sorted
    by length (jittered by up to ``jitter`` of their length, so that a batch's rows change
    from epoch to epoch) pad little. The batches are then shuffled; a short last batch stays
    last, as the data loader cuts the stream into batches of ``batch_size`` in order. Each epoch
    draws from ``seed`` and the epoch number (the Trainer calls :meth:`set_epoch`, a resumed
    run included), so a run is repeatable.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, jitter: float = 0.1):
        self.lengths = list(lengths)
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.jitter = jitter
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order from this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are served."""
        import random

        draw = random.Random(self.seed * 1_000_003 + self.epoch)
        keys = [n * (1.0 + self.jitter * draw.random()) for n in self.lengths]
        order = sorted(range(len(self.lengths)), key=keys.__getitem__)
        size = self.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        short = batches.pop() if batches and len(batches[-1]) < size else None
        draw.shuffle(batches)
        return batches + ([short] if short else [])

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


class ListDataset:
    """A list as a map-style dataset (the Trainer only needs len and indexing)."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def data_record(paths: Sequence[Path], records: Sequence[Record]) -> list[dict[str, Any]]:
    """Each data file with its hash, row counts per split and its multi-turn rows."""
    from distill.models import sha256_file

    out = []
    for path in paths:
        rows = [r for r in records if Path(r.source) == path]
        out.append(
            {
                "path": str(path),
                "sha256": sha256_file(path),
                "rows": len(rows),
                "train": sum(r.split == "train" for r in rows),
                "heldout": sum(r.split == "heldout" for r in rows),
                "conversations": sum(bool(r.history) for r in rows),
            }
        )
    return out
