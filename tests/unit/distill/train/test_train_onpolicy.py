"""On-policy distillation: prompts kept, the student samples, the teacher's top K aligned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.encoding import IGNORE_INDEX
from distill.train import TrainArgs, TrainError
from distill.train import run as train_run
from distill.train.losses import Objective
from distill.train.onpolicy import prompts_of, sample_answers, stop_ids, teacher_batch


@pytest.fixture(scope="module")
def student(sharp_teacher: Path):
    """The sharpened tiny model: peaked distributions, so misplaced targets show."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sharp_teacher, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(sharp_teacher)


def test_prompts_are_the_tokens_before_the_first_label() -> None:
    import torch

    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 9, 10, 11, 12]]),
        "labels": torch.tensor([[IGNORE_INDEX] * 2 + [7, 8, IGNORE_INDEX], [IGNORE_INDEX, 9, 10,
                                11, 12]]),
    }  # fmt: skip
    assert prompts_of(batch) == [[5, 6], [5]]


def test_sampled_answers_stop_at_their_stop_token(student) -> None:
    import torch

    model, tokenizer = student
    torch.manual_seed(0)
    prompts = [[2, 40, 41, 42], [2, 50]]
    answers = sample_answers(model, prompts, tokenizer.pad_token_id, [7, 9], 12, 1.0)
    assert len(answers) == 2
    for answer in answers:
        assert 1 <= len(answer) <= 12
        assert all(t not in (7, 9) for t in answer[:-1])  # a stop token only at the end


def test_the_teachers_targets_describe_the_sampled_tokens(student) -> None:
    """Teacher = student: on its own samples, with the targets aligned, the KL is zero."""
    import torch

    model, tokenizer = student
    torch.manual_seed(1)
    prompts = [[2, 40, 41, 42, 43], [2, 50]]
    answers = sample_answers(model, prompts, tokenizer.pad_token_id, stop_ids(tokenizer), 6, 1.0)
    batch = teacher_batch(model, prompts, answers, tokenizer.pad_token_id, k=8)
    labels = batch["labels"]
    has_target = batch["teacher_ids"][..., 0] >= 0
    assert torch.equal(has_target, labels != IGNORE_INDEX)
    assert labels[0, 5 : 5 + len(answers[0])].tolist() == answers[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd, _ = Objective("kd").from_logits(
        logits, labels, batch["teacher_ids"], batch["teacher_logprobs"]
    )
    assert float(kd) < 1e-5
    # The same targets one token early (not shifted) would not match the logits.
    early = {k: torch.roll(batch[k], -1, dims=1) for k in ("teacher_ids", "teacher_logprobs")}
    wrong, _ = Objective("kd").from_logits(
        logits, labels, early["teacher_ids"], early["teacher_logprobs"]
    )
    assert float(wrong) > 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"on_policy": 0.5, "loss": "kd"}, "--on-policy needs --teacher-model"),
        ({"on_policy": 0.5, "teacher_model": "x"}, "--on-policy needs --loss kd or mix"),
        ({"on_policy": 1.5, "loss": "kd", "teacher_model": "x"}, r"on_policy: a share"),
    ],
    ids=["a teacher to score", "a kd loss", "a share of batches"],
)
def test_on_policy_arguments_are_checked(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainArgs(data=[tmp_path / "d.jsonl"], output=tmp_path / "o", **overrides)


def test_a_scoring_teacher_of_another_vocabulary_is_refused(
    kd_data: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from distill.models import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", ["Bonjour tout le monde."] * 20, vocab_size=300)
    args = TrainArgs(data=[kd_data], output=tmp_path / "out", base_model=str(tiny_model),
                     loss="kd", on_policy=0.5, teacher_model=str(other))  # fmt: skip
    with pytest.raises(TrainError, match=r"--teacher-model .*other: its vocabulary \(sha256:"):
        train_run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_on_policy_training_learns_the_teacher(
    kd_data: Path, sharp_teacher: Path, tmp_path: Path, tiny_model: Path
) -> None:
    out = tmp_path / "run"
    args = TrainArgs(data=[kd_data], output=out, base_model=str(tiny_model), loss="kd",
                     on_policy=1.0, teacher_model=str(sharp_teacher), on_policy_max_new_tokens=8,
                     max_steps=6, batch_size=4, lora_rank=4, learning_rate=5e-3,
                     logging_steps=1, max_length=256, packing="on")  # fmt: skip
    train_run(args)
    record = json.loads((out / "training_record.json").read_text())
    loss = record["loss"]
    assert loss["on_policy"]["batches"] == 6 and loss["on_policy"]["top_k"] == 8
    assert 6 <= loss["on_policy"]["sampled_tokens"] <= 6 * 4 * 8
    assert all("kd_on_policy" in entry for entry in record["metrics"]["losses"])
    assert record["device"]["packing"] is False  # turned off: a rebuilt batch needs its rows
    kl = loss["kl_to_teacher"]
    assert kl["train_after"] < kl["train_before"]
