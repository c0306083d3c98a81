"""On-policy distillation (GKD): the student writes the answers, a local teacher scores them.

    distill train --data labelled.jsonl --output runs/s --loss kd \\
        --teacher-model embedded:smollm2-135m-instruct --on-policy 0.5

With ``--on-policy λ`` a share λ of the training batches (drawn with the run's seed) is rebuilt
before its step: the batch's prompts are kept, the student samples an answer to each
(``--on-policy-temperature``, at most ``--on-policy-max-new-tokens``), the teacher (loaded here,
its vocabulary the student's) reads prompt + answer once, and its top K log-probabilities at
each sampled token become the targets of the same K + 1 bin KL as the stored ones
(:mod:`distill.train.losses`). The other batches train on the labelled answers as before. Such a
batch trains on the KL alone (a cross-entropy on the student's own samples would only reinforce
them), so under ``mix`` its weight is the KD's. This is GKD (Agarwal et al., 2024) with the
forward KL and a student-data fraction λ; TRL's ``GKDTrainer`` does the same over its own dataset
and collator, which would bypass this stage's encoding, so it is not used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from distill.encoding import IGNORE_INDEX
from distill.train.data import IGNORE_TARGET


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt ids: the tokens before its first label (rows of an unpacked batch)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        start = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        prompts.append(ids[:start])
    return prompts


def sample_answers(
    student: Any,
    prompts: list[list[int]],
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
) -> list[list[int]]:
    """The student's sampled answers, each cut after its first stop token (kept)."""
    import torch

    device = next(student.parameters()).device
    width = max(len(p) for p in prompts)
    # Left padding: every prompt ends where generation starts.
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stop_ids or None,
                use_cache=True,
            )
    finally:
        student.train(was_training)
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        answers.append(row[:end])
    return answers


def teacher_batch(
    teacher: Any,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    k: int,
) -> dict[str, Any]:
    """Prompt + answer rows, right-padded, with the teacher's top-K at each answer token.

    The teacher's logits at position t describe token t + 1, so its top K there are stored at
    t + 1, the token's own position, where the stored targets sit too.
    """
    import torch

    device = next(teacher.parameters()).device
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, : len(prompt) + len(answer)] = 1
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    with torch.no_grad():
        logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        top = torch.topk(torch.log_softmax(logits[:, :-1].float(), -1), k, dim=-1)
    top_ids = torch.full((len(rows), width, k), IGNORE_TARGET, dtype=torch.int32, device=device)
    top_lp = torch.zeros((len(rows), width, k), dtype=torch.float32, device=device)
    answer = (labels[:, 1:] != IGNORE_INDEX).to(device)
    top_ids[:, 1:][answer] = top.indices[answer].int()
    top_lp[:, 1:][answer] = top.values[answer]
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "teacher_ids": top_ids,
        "teacher_logprobs": top_lp,
    }


def load_teacher(name: str, device: str, dtype: str, revision: str | None, token: str | None):
    """The teacher for on-policy batches, frozen, in the student's dtype on its device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import resolve_model
    from distill.train.device import torch_dtype

    path, source = resolve_model(name, revision=revision, token=token)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), attn_implementation="sdpa"
    ).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path), source


@dataclass
class OnPolicy:
    """What an on-policy batch needs: the teacher, the share λ, and how to sample."""

    teacher: Any
    share: float
    k: int
    pad_id: int
    stop_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    seed: int = 0
    batches: int = 0  # on-policy micro-batches so far
    sampled_tokens: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> bool:
        """Whether the next batch is on-policy (a seeded draw, the same every run)."""
        return self._rng.random() < self.share

    def batch(self, student: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch rebuilt on the student's samples of its prompts, with the teacher's top K."""
        prompts = prompts_of(batch)
        answers = sample_answers(
            student, prompts, self.pad_id, self.stop_ids, self.max_new_tokens, self.temperature
        )
        self.batches += 1
        self.sampled_tokens += sum(len(a) for a in answers)
        return teacher_batch(self.teacher, prompts, answers, self.pad_id, self.k)

    def record(self) -> dict[str, Any]:
        """For the run record."""
        return {
            "share": self.share,
            "top_k": self.k,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "batches": self.batches,
            "sampled_tokens": self.sampled_tokens,
        }


def stop_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a sampled answer: end-of-sequence, and ChatML's end of turn."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return ids
