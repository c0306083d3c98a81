"""Training batches (``distill.train.data``): the loss covers the teacher's answer and nothing else.

A conversation's earlier turns, its earlier assistant turns included, are context: they came
with the row, not from the teacher, so their tokens carry no label.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from distill.encoding import IGNORE_INDEX, encode_all
from distill.records import record_from_dict
from distill.train.data import Collator, LengthBatches, data_record, pack

EARLIER = "Oui, je suis là, je t'écoute."
ANSWER = "Ben oui, on va jaser de hockey."


def conversation(**changes):
    row = {
        "id": "c1",
        "system_hint": "Réponds en québécois.",
        "history": [
            {"role": "user", "content": "Allo, t'es-tu là?"},
            {"role": "assistant", "content": EARLIER},
        ],
        "user": "On peut-tu jaser de hockey?",
        "reference": "Une réponse d'ailleurs qui ne compte pas.",
        "assistant": ANSWER,
    }
    return record_from_dict({**row, **changes})


@pytest.mark.parametrize("style", ["chat", "plain"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_only_the_teacher_answer_of_a_conversation_is_learned(
    tiny_model: Path, style: str, packed: bool
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    single = record_from_dict({"id": "s1", "user": "Salut!", "assistant": "Allo toi."})
    examples, stats = encode_all([conversation(), single], tokenizer, style, 512)
    items = pack(examples, 512) if packed else examples
    batch = Collator(tokenizer.pad_token_id or 0, packed=packed)(items)
    assert stats["sequences"] == 2
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        # A label is the token at its position, or none.
        assert all(t in (i, IGNORE_INDEX) for t, i in zip(labels, ids, strict=True))
        seen = tokenizer.decode(ids, skip_special_tokens=True)
        learned = tokenizer.decode(
            [t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True
        )
        if packed or "hockey?" in seen:
            assert EARLIER in seen and "hockey?" in seen and "ailleurs" not in seen
            assert ANSWER in learned
            assert EARLIER not in learned and "hockey?" not in learned and "ailleurs" not in learned
            assert learned.replace(ANSWER, "").replace("Allo toi.", "").strip() == ""
        else:
            assert learned.strip() == "Allo toi."


def test_the_run_record_counts_conversations_per_file(tmp_path: Path) -> None:
    path = tmp_path / "talk.jsonl"
    path.write_text('{"user": "x"}\n', encoding="utf-8")
    records = [
        replace(conversation(), source=str(path)),
        record_from_dict({"id": "b", "user": "x"}, path=path, line=2),
    ]
    (item,) = data_record([path], records)
    assert (item["rows"], item["conversations"]) == (2, 1)


def test_with_the_teachers_token_ids_a_conversation_learns_those_ids_alone(
    tiny_model: Path,
) -> None:
    from transformers import AutoTokenizer

    from distill.encoding import encode_record_with_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    example = encode_record_with_ids(conversation(), "chat", tokenizer, ids, 512)
    assert example is not None
    assert [t for t in example.labels if t != IGNORE_INDEX] == ids
    prompt = tokenizer.decode(example.input_ids[: -len(ids)], skip_special_tokens=True)
    assert EARLIER in prompt and "hockey?" in prompt


def _padding(batches: list[list[int]], lengths: list[int]) -> float:
    """Padded tokens over real tokens, for batches of row indices."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return padded / sum(lengths)


def test_length_batches_pad_little_and_serve_every_row_once_per_epoch() -> None:
    import random

    draw = random.Random(1)
    lengths = [draw.randint(40, 400) for _ in range(157)]  # 19 batches of 8 and one of 5
    sampler = LengthBatches(lengths, batch_size=8, seed=0)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(157))
    assert [len(b) for b in batches] == [8] * 19 + [5]  # the short batch last, always
    assert list(sampler) == [i for b in batches for i in b]
    shuffled = list(range(157))
    draw.shuffle(shuffled)
    at_random = [shuffled[i : i + 8] for i in range(0, 157, 8)]
    assert _padding(batches, lengths) < 1.1 < _padding(at_random, lengths)
    # Not long rows first then short: the batches come in a drawn order.
    widths = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_length_batches_are_repeatable_per_epoch_and_change_between_epochs() -> None:
    lengths = [50 + (i * 37) % 300 for i in range(64)]
    first = LengthBatches(lengths, 8, seed=3)
    again = LengthBatches(lengths, 8, seed=3)
    assert first.batches() == again.batches()  # a resumed run sees the same order
    first.set_epoch(1)
    assert first.batches() != again.batches()
    again.set_epoch(1)
    assert first.batches() == again.batches()
    # The jitter changes which rows share a batch, not only the batches' order.
    first.set_epoch(0)
    rows_together = {frozenset(b) for b in first.batches()}
    first.set_epoch(1)
    assert rows_together != {frozenset(b) for b in first.batches()}
    assert LengthBatches(lengths, 8, seed=4).batches() != again.batches()
