"""Student against teacher along the teacher's answers, teacher-forced.

Both models read the same ids (the labelling prompt and the teacher's recorded answer); at every
position whose next token is an answer token, the eval compares the two next-token
distributions: whether their top-1 tokens agree, and KL(teacher || student) in nats. The
teacher's distribution is the reference, so the KL is what distillation minimises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distill.encoding import IGNORE_INDEX, Example, pad_examples


@dataclass
class Agreement:
    """Running counts of top-1 agreement and KL(teacher || student) over answer positions."""

    tokens: int = 0
    same_top1: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0  # of the answer tokens themselves, for the student's perplexity
    nll_tokens: int = 0

    def add_nll(self, logits: Any, targets: Any) -> None:
        """Add the negative log-likelihood of ``targets`` [N] under next-token ``logits``
        [N, V] (the model's whole output, padding rows included, as its perplexity is)."""
        import torch

        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        self.nll_sum += float(nll)
        self.nll_tokens += int(targets.numel())

    def add(self, teacher_logits: Any, student_logits: Any) -> None:
        """Add rows of next-token logits (``[positions, vocab]``, the same positions in both)."""
        import torch

        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"logits of different shapes: teacher {tuple(teacher_logits.shape)}, "
                f"student {tuple(student_logits.shape)}"
            )
        teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
        student = torch.log_softmax(student_logits.float(), dim=-1)
        probs = teacher.exp()
        # p log(p/q), with 0 log 0 = 0 where the teacher's probability underflows.
        terms = torch.where(probs > 0, probs * (teacher - student), torch.zeros_like(probs))
        self.kl_sum += float(terms.sum())
        self.same_top1 += int((teacher.argmax(-1) == student.argmax(-1)).sum())
        self.tokens += int(teacher.shape[0])

    def summary(self) -> dict[str, Any]:
        """``answer_perplexity``, ``top1_agreement`` (a fraction), ``mean_kl`` (nats per token)
        and ``tokens``."""
        import math

        perplexity = round(math.exp(self.nll_sum / self.nll_tokens), 4) if self.nll_tokens else None
        if not self.tokens:
            return {
                "answer_perplexity": perplexity,
                "top1_agreement": None,
                "mean_kl": None,
                "tokens": 0,
            }
        return {
            "answer_perplexity": perplexity,
            "top1_agreement": round(self.same_top1 / self.tokens, 4),
            "mean_kl": round(self.kl_sum / self.tokens, 5),
            "tokens": self.tokens,
        }


TEACHER = "teacher"  # teacher_forced's entry for the teacher's own perplexity


def teacher_forced(
    teacher: Any,
    students: Mapping[str, Any],
    examples: Sequence[Example],
    pad_id: int,
    vocab_size: int,
    batch_size: int = 4,
) -> dict[str, dict[str, Any]]:
    """Agreement, KL and perplexity of each student (by name) along the teacher's answer tokens,
    and under :data:`TEACHER` the teacher's own perplexity: one forward pass per model.

    ``vocab_size`` is the shared tokenizer's: an embedding wider than it (padding rows) is cut
    off for agreement and KL, so both distributions cover the same tokens.
    """
    import torch

    from distill.encoding import answer_logits, split_head

    if TEACHER in students:
        raise ValueError(f"a student may not be named {TEACHER!r}")
    device = next(teacher.parameters()).device
    models = {TEACHER: teacher, **students}
    splits = {name: split_head(model) for name, model in models.items()}
    results = {name: Agreement() for name in models}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels, mask = pad_examples(examples[start : start + batch_size], pad_id)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            # Logits at position t predict token t+1: only the positions whose next token is an
            # answer token go through the output layer (the prompt is most of each row).
            target = labels[:, 1:].to(device)
            answer = target != IGNORE_INDEX
            reference = None
            for name, model in models.items():
                logits = answer_logits(model, inputs, answer, splits[name])
                results[name].add_nll(logits, target[answer])
                if reference is None:
                    reference = logits[:, :vocab_size]
                else:
                    results[name].add(reference, logits[:, :vocab_size])
    out = {name: agreement.summary() for name, agreement in results.items()}
    out[TEACHER] = {"answer_perplexity": out[TEACHER]["answer_perplexity"]}
    return out
