"""Real ``--loss kd`` and ``--loss mix`` runs on the tiny model: the KL to the teacher falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.logprobs import FIELD
from distill.train import TrainArgs
from distill.train import run as train_run


def args(data: Path, out: Path, base: Path, **overrides) -> TrainArgs:
    values = dict(data=[data], output=out, base_model=str(base), max_steps=6, batch_size=4,
                  lora_rank=4, learning_rate=5e-3, logging_steps=1, max_length=256)  # fmt: skip
    values.update(overrides)
    return TrainArgs(**values)


def merged_kl(model_dir: Path, data: Path, split: str) -> float | None:
    """The saved student's KL to the teacher on ``split`` rows, measured from the files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.records import read_records
    from distill.train.data import Collator
    from distill.train.losses import teacher_kl
    from distill.train.teacher import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [r for r in read_records(data) if r.split == split]
    examples, _ = encode_rows(rows, tokenizer, "auto", 256)
    collate = Collator(tokenizer.pad_token_id, packed=False, teacher=True)
    return teacher_kl(model, [collate(examples[i : i + 4]) for i in range(0, len(examples), 4)])


@pytest.mark.slow
def test_kd_training_lowers_the_kl_to_the_teachers_targets(
    kd_data: Path, tmp_path: Path, tiny_model: Path
) -> None:
    out = tmp_path / "run"
    summary = train_run(args(kd_data, out, tiny_model, loss="kd", packing="on"))
    record = json.loads((out / "training_record.json").read_text())
    loss = record["loss"]
    assert (loss["loss"], loss["kd_temperature"], loss["kd_weight"]) == ("kd", 1.0, 1.0)
    assert loss["teacher_vocab_hash"].startswith("sha256:")
    assert loss["teacher_vocab_hash"] == loss["student_vocab_hash"]
    assert loss["teacher_target_share"] == 1.0 and loss["rows_with_targets"] == 12
    kl = loss["kl_to_teacher"]
    assert kl["train_after"] < 0.95 * kl["train_before"]
    assert kl["heldout_after"] < kl["heldout_before"]
    # The merged model on disk is the one that learned: its KL is the one measured after.
    assert merged_kl(out / "model", kd_data, "train") == pytest.approx(kl["train_after"], rel=1e-3)
    assert all("kd" in entry and "ce" not in entry for entry in record["metrics"]["losses"])
    assert record["device"]["packing"] is True
    assert summary["loss"] == "kd" and summary["steps"] == 6
    assert summary["merge_max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_mix_trains_rows_without_logprobs_on_cross_entropy(
    kd_data: Path, tmp_path: Path, tiny_model: Path
) -> None:
    rows = [json.loads(line) for line in kd_data.read_text().splitlines()]
    for row in rows[1::2]:
        del row[FIELD]
    data = kd_data.with_name("half.jsonl")
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "run"
    # Two micro-batches a step: the logged loss is still the mix of the logged parts.
    train_run(
        args(data, out, tiny_model, loss="mix", kd_weight=0.7, kd_temperature=2.0, grad_accum=2)
    )
    record = json.loads((out / "training_record.json").read_text())
    loss = record["loss"]
    assert (loss["loss"], loss["kd_temperature"], loss["kd_weight"]) == ("mix", 2.0, 0.7)
    assert (loss["rows_with_targets"], loss["rows_without_targets"]) == (6, 6)
    assert 0.3 < loss["teacher_target_share"] < 0.7
    assert record["train_data"]["teacher_target_share"] == loss["teacher_target_share"]
    kl = loss["kl_to_teacher"]
    assert kl["train_after"] < kl["train_before"]
    first = record["metrics"]["losses"][0]
    assert first["loss"] == pytest.approx(0.3 * first["ce"] + 0.7 * first["kd"], abs=2e-4)
