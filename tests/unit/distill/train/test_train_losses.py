"""The kd objective: KL over the teacher's top K plus a rest bin, temperature, the label shift."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.encoding import IGNORE_INDEX, split_head
from distill.train.data import Collator, pack
from distill.train.losses import CHUNK_LOGITS, Objective, topk_kl
from distill.train.teacher import TeacherTargets, TrainExample


@dataclass
class Case:
    """Student logits over five ids, the teacher's top two, and a temperature."""

    logits: list[float]
    top_ids: list[int]
    top_probs: list[float]  # the teacher's probabilities of its candidates
    temperature: float


def expected_kl(case: Case) -> float:
    """The KL by hand: teacher bins (K candidates + rest) against the student's same bins."""
    t = case.temperature
    rest = max(0.0, 1.0 - sum(case.top_probs))
    bins = [*case.top_probs, rest]
    # Temperature on the teacher: p^(1/T), renormalised over the bins.
    powered = [p ** (1 / t) if p > 0 else 0.0 for p in bins]
    teacher = [p / sum(powered) for p in powered]
    # Temperature on the student: softmax(z / T) over every id, then the same bins.
    exps = [math.exp(z / t) for z in case.logits]
    student_all = [e / sum(exps) for e in exps]
    student_top = [student_all[i] for i in case.top_ids]
    student = [*student_top, 1.0 - sum(student_top)]
    return sum(q * math.log(q / s) for q, s in zip(teacher, student, strict=True) if q > 0)


CASES = {
    "tail mass at T = 1": Case([2.0, 0.5, -1.0, 0.0, 1.0], [0, 4], [0.5, 0.3], 1.0),
    "tail mass at T = 2": Case([2.0, 0.5, -1.0, 0.0, 1.0], [0, 4], [0.5, 0.3], 2.0),
    "no tail, candidates out of order": Case([0.1, -2.0, 3.0, 0.3, 0.0], [3, 1], [0.6, 0.4], 1.0),
    "teacher sure of an unlikely id, T = 0.5": Case([3.0, 0.0, 0.0, 0.0, 0.0], [2, 0],
                                                    [0.9, 0.05], 0.5),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_topk_kl_matches_the_hand_computed_kl(case: Case) -> None:
    got = topk_kl(
        torch.tensor([case.logits]),
        torch.tensor([case.top_ids]),
        torch.tensor([[math.log(p) for p in case.top_probs]]),
        case.temperature,
    )
    assert float(got[0]) == pytest.approx(expected_kl(case), rel=1e-5, abs=1e-7)


def test_the_objective_scales_by_t_squared_and_mixes_with_cross_entropy() -> None:
    case = CASES["tail mass at T = 2"]
    # Two positions: the first predicts the second, which holds the teacher's targets.
    logits = torch.tensor([[case.logits, [0.0] * 5]])
    ids = torch.tensor([[[-1, -1], case.top_ids]])
    logprobs = torch.tensor([[[0.0, 0.0], [math.log(p) for p in case.top_probs]]])
    labels = torch.tensor([[IGNORE_INDEX, 4]])
    kd, _ = Objective("kd", temperature=2.0).from_logits(logits, labels, ids, logprobs)
    assert float(kd) == pytest.approx(4.0 * expected_kl(case), rel=1e-5)
    ce = -math.log(math.exp(1.0) / sum(math.exp(z) for z in case.logits))
    mix, parts = Objective("mix", 2.0, 0.25).from_logits(logits, labels, ids, logprobs)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(mix) == pytest.approx(0.75 * ce + 0.25 * 4.0 * expected_kl(case), rel=1e-5)


def test_empty_slots_add_nothing_and_forbidden_candidates_leave_the_rest_bin() -> None:
    case = CASES["tail mass at T = 1"]
    logits = torch.tensor([case.logits], requires_grad=True)
    # A third slot past this row's K (-1) and a fourth candidate the grammar forbade (-inf):
    # the forbidden id is a bin of its own with no teacher mass, outside the student's rest.
    ids = torch.tensor([[*case.top_ids, -1, 2]])
    logprobs = torch.tensor([[*(math.log(p) for p in case.top_probs), 0.0, float("-inf")]])
    kl = topk_kl(logits, ids, logprobs)
    forbidden = Case(case.logits, [*case.top_ids, 2], [*case.top_probs, 0.0], 1.0)
    assert float(kl[0].detach()) == pytest.approx(expected_kl(forbidden), rel=1e-5)
    assert expected_kl(forbidden) != pytest.approx(expected_kl(case))  # the bin matters
    kl.sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def test_a_labelled_position_without_teacher_targets_adds_no_kl_and_no_nan() -> None:
    """mix: one position has the teacher's targets, the next only a label (a row labelled
    without log-probabilities): the KD term is the first position's alone, finite gradients."""
    case = CASES["tail mass at T = 1"]
    logits = torch.tensor([case.logits, [0.5, -1.0, 2.0, 0.0, 1.0]], requires_grad=True)
    ids = torch.tensor([case.top_ids, [-1] * len(case.top_ids)])
    logprobs = torch.tensor([[math.log(p) for p in case.top_probs], [0.0] * len(case.top_ids)])
    labels = torch.tensor([1, 2])
    loss, parts = Objective("mix", 1.0, 0.5).from_positions(logits, labels, ids, logprobs)
    assert float(parts["kd"]) == pytest.approx(expected_kl(case), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.detach(), labels)
    assert float(parts["ce"]) == pytest.approx(float(ce), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def example(prompt: list[int], answer: list[int], k: int = 3) -> TrainExample:
    """A sequence whose teacher put each answer token first, then ids 1 and 2."""
    top = np.array([[t, 1, 2][:k] for t in answer], dtype=np.int32)
    logprobs = np.log(np.array([[0.9, 0.05, 0.03][:k]] * len(answer), dtype=np.float32))
    return TrainExample(
        id="x",
        input_ids=prompt + answer,
        labels=[IGNORE_INDEX] * len(prompt) + answer,
        teacher=TeacherTargets(len(prompt), top, logprobs),
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded rows", "packed rows"])
def test_teacher_targets_sit_on_the_tokens_they_describe(packed: bool) -> None:
    examples = [example([5, 6, 7], [10, 11, 12, 3]), example([5, 8], [13, 3], k=2)]
    items = pack(examples, 64) if packed else examples
    batch = Collator(pad_id=0, packed=packed, teacher=True)(items)
    ids, labels = batch["teacher_ids"], batch["labels"]
    assert ids.shape[:2] == labels.shape and ids.shape[2] == 3  # the batch's largest K
    has_target = ids[..., 0] >= 0
    # Exactly the answer tokens carry targets, and the teacher's first pick is that token.
    assert torch.equal(has_target, labels != IGNORE_INDEX)
    assert torch.equal(ids[..., 0][has_target], batch["input_ids"][has_target].int())
    short = ids[labels == 13][0]  # the K = 2 row: its third slot is empty
    assert short.tolist() == [13, 1, -1]


def test_logits_at_t_are_scored_against_the_targets_of_token_t_plus_1() -> None:
    examples = [example([5, 6, 7], [10, 11, 12, 3]), example([5, 8], [13, 3])]
    batch = Collator(pad_id=0, packed=False, teacher=True)(examples)
    input_ids = batch["input_ids"]
    # A student that at position t predicts token t + 1 as the teacher does: 0.9 on it, 0.05 and
    # 0.03 on ids 1 and 2, the rest (0.02) spread over the 17 other ids.
    logits = torch.full((*input_ids.shape, 20), math.log(0.02 / 17))
    logits[..., 1] = math.log(0.05)
    logits[..., 2] = math.log(0.03)
    logits[:, :-1].scatter_(-1, input_ids[:, 1:].unsqueeze(-1), math.log(0.9))
    objective = Objective("kd")
    aligned, _ = objective.from_logits(
        logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"]
    )
    assert float(aligned) < 0.01
    # The same student read one position late (no shift) is far from the teacher.
    late = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    misaligned, _ = objective.from_logits(
        late, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"]
    )
    assert float(misaligned) > 1.0


def _lora(model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # B = 0 at init: make the adapters count
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def _grads(model: Any) -> list[Any]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("loss", ["sft", "kd", "mix"])
def test_logits_at_the_answers_positions_give_the_full_forwards_loss_and_gradients(
    tiny_model: Path, loss: str, chunked: bool
) -> None:
    model = _lora(tiny_model)
    split = split_head(model)
    assert split is not None
    examples = [example([5, 6, 7], [10, 11, 12, 3]), example([5, 8, 9, 9, 9, 9], [13, 3])]
    batch = Collator(pad_id=0, packed=False, teacher=True)(examples)
    vocab = model.config.vocab_size
    # Chunked: two positions' logits at a time, recomputed in the backward pass.
    objective = Objective(loss, 2.0, 0.3, chunk_logits=2 * vocab if chunked else CHUNK_LOGITS)
    calls = []
    hook = split.head.register_forward_hook(lambda *_: calls.append(1))
    if loss == "sft":  # the model's own loss, from every position's logits
        keys = ("input_ids", "attention_mask", "labels")
        full = model(**{k: batch[k] for k in keys}).loss
    else:
        full, _ = objective(model, batch)
    full.backward()
    expected = _grads(model)
    calls.clear()
    sparse, parts = objective(model, batch, split)
    sparse.backward()
    hook.remove()
    # Whole: one projection. Chunked: 3 chunks of the 5 or 6 answer positions, each run twice.
    assert len(calls) == (6 if chunked else 1)
    assert float(sparse.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert set(parts) == {"sft": {"ce"}, "kd": {"kd"}, "mix": {"ce", "kd"}}[loss]
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_model_that_scales_its_logits_keeps_the_full_forward() -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           logits_scaling=4.0)  # fmt: skip
    assert split_head(GraniteForCausalLM(config)) is None  # head(decoder(x)) is 4x its logits
    config.logits_scaling = 1.0
    assert split_head(GraniteForCausalLM(config)) is not None
