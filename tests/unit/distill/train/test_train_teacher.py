"""The teacher's targets before training: which rows have them, the vocabulary, the encoding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill.encoding import IGNORE_INDEX, DataError, encode_record_with_ids
from distill.logprobs import FIELD, read_for
from distill.records import read_records
from distill.train import TrainArgs, TrainError
from distill.train import run as train_run
from distill.train.teacher import TrainExample, encode_rows


def args(data: Path, out: Path, base: Path, **overrides) -> TrainArgs:
    values = dict(data=[data], output=out, base_model=str(base), max_steps=2, batch_size=4,
                  lora_rank=4, learning_rate=5e-3, logging_steps=1, max_length=256)  # fmt: skip
    values.update(overrides)
    return TrainArgs(**values)


def rewrite(path: Path, edit) -> Path:
    """``path`` with ``edit(index, row)`` applied to each row, beside the same sidecar."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for index, row in enumerate(rows):
        edit(index, row)
    out = path.with_name("edited.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "distil"}, "loss: one of sft, kd, mix"),
        ({"kd_temperature": 0.0}, "kd_temperature: must be positive"),
        ({"kd_weight": 1.5}, r"kd_weight: must be in \[0, 1\]"),
    ],
    ids=["a known loss", "a positive temperature", "a weight in [0, 1]"],
)
def test_bad_kd_arguments_fail_at_parse_time(tmp_path: Path, overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        args(tmp_path / "x.jsonl", tmp_path / "out", tmp_path, **overrides)


def test_the_package_imports_without_torch() -> None:
    import subprocess

    modules = ", ".join(
        f"distill.train.{m}"
        for m in (
            "args",
            "data",
            "device",
            "loop",
            "losses",
            "merge",
            "model",
            "onpolicy",
            "stage",
            "teacher",
        )
    )
    loaded = "'torch' in sys.modules, 'distill.evaluate' in sys.modules"
    code = f"import sys, {modules}; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_answer_ids_are_exactly_the_teachers_tokens(kd_data: Path, tokenizer) -> None:
    record = read_records(kd_data)[0]
    block = read_for(record)
    assert block is not None
    example = encode_record_with_ids(record, "chat", tokenizer, block.token_ids, 256)
    assert example is not None
    answer = [x for x in example.labels if x != IGNORE_INDEX]
    assert answer == block.token_ids.tolist()
    assert example.input_ids[-len(answer) :] == answer
    room = len(example.input_ids) - len(answer) + 3
    cut = encode_record_with_ids(record, "chat", tokenizer, block.token_ids, room)
    assert cut is not None and cut.truncated and cut.labels[-3:] == block.token_ids[:3].tolist()


def test_truncated_answers_keep_the_targets_of_the_tokens_kept(kd_data: Path, tokenizer) -> None:
    records = read_records(kd_data)[:2]
    full, _ = encode_rows(records, tokenizer, "auto", 256)
    prompt = len(full[0].input_ids) - sum(1 for x in full[0].labels if x != IGNORE_INDEX)
    cut, stats = encode_rows(records, tokenizer, "auto", prompt + 4)
    first = cut[0]
    assert isinstance(first, TrainExample) and first.teacher is not None
    assert first.teacher.start == prompt and first.teacher.top_ids.shape[0] == 4
    assert (first.teacher.top_ids == read_for(records[0]).top_ids[:4]).all()
    assert stats["truncated"] >= 1 and stats["teacher_target_share"] == 1.0


def test_an_answer_edited_after_labelling_names_its_row(kd_data: Path, tmp_path: Path,
                                                        tiny_model: Path) -> None:  # fmt: skip
    def edit(index: int, row: dict) -> None:
        if index == 2:
            row["assistant"] = row["assistant"] + " (revu)"

    data = rewrite(kd_data, edit)
    with pytest.raises(DataError, match=r"edited.jsonl:3: the teacher's token ids spell .* not"):
        train_run(args(data, tmp_path / "out", tiny_model, loss="kd"))


def test_another_vocabulary_is_refused_naming_both(
    kd_data: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    from distill.logprobs import vocab_hash

    other = "sha256:" + "0" * 64

    def edit(_: int, row: dict) -> None:
        row["metadata"]["provenance"]["labeller"]["vocab_hash"] = other

    data = rewrite(kd_data, edit)
    with pytest.raises(TrainError) as err:
        train_run(args(data, tmp_path / "out", tiny_model, loss="mix"))
    student = vocab_hash(AutoTokenizer.from_pretrained(tiny_model))
    assert other in str(err.value) and student in str(err.value)
    assert "--loss sft" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_kd_lists_the_rows_without_logprobs(kd_data: Path, tmp_path: Path, tiny_model: Path):
    def edit(index: int, row: dict) -> None:
        if index % 2:
            del row[FIELD]

    data = rewrite(kd_data, edit)
    with pytest.raises(TrainError, match=r"6 row\(s\) have no teacher_logprobs.*edited.jsonl:2 "
                       r"\(r01\), .*edited.jsonl:4 \(r03\)"):  # fmt: skip
        train_run(args(data, tmp_path / "out", tiny_model, loss="kd"))


def test_mix_needs_at_least_one_row_with_logprobs(data_without: Path, tmp_path: Path,
                                                  tiny_model: Path) -> None:  # fmt: skip
    with pytest.raises(TrainError, match="--loss mix: no row has teacher_logprobs"):
        train_run(args(data_without, tmp_path / "out", tiny_model, loss="mix"))


def test_rows_of_two_teachers_are_refused(kd_data: Path, tmp_path: Path, tiny_model: Path):
    def edit(index: int, row: dict) -> None:
        if index == 5:
            row["metadata"]["provenance"]["labeller"]["vocab_hash"] = "sha256:other"

    data = rewrite(kd_data, edit)
    with pytest.raises(TrainError, match=r"other vocabularies: .*sha256:other \(.*edited.jsonl:6"):
        train_run(args(data, tmp_path / "out", tiny_model, loss="kd"))


@pytest.fixture
def data_without(kd_data: Path) -> Path:
    """The kd rows with no teacher_logprobs at all."""
    return rewrite(kd_data, lambda _, row: row.pop(FIELD))
