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
        """``top1_agreement`` (a fraction), ``mean_kl`` (nats per token) and ``tokens``."""
        if not self.tokens:
            return {"top1_agreement": None, "mean_kl": None, "tokens": 0}
        return {
            "top1_agreement": round(self.same_top1 / self.tokens, 4),
            "mean_kl": round(self.kl_sum / self.tokens, 5),
            "tokens": self.tokens,
        }


def teacher_forced(
    teacher: Any,
    students: Mapping[str, Any],
    examples: Sequence[Example],
    pad_id: int,
    vocab_size: int,
    batch_size: int = 4,
) -> dict[str, dict[str, Any]]:
    """Agreement and KL of each student (by name) with the teacher along the answer tokens.

    ``vocab_size`` is the shared tokenizer's: an embedding wider than it (padding rows) is cut
    off, so both distributions cover the same tokens.
    """
    import torch

    device = next(teacher.parameters()).device
    results = {name: Agreement() for name in students}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels, mask = pad_examples(examples[start : start + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            # Logits at position t predict token t+1: keep the positions whose next token is an
            # answer token, before the softmax (the prompt is most of each row).
            answer = (labels[:, 1:] != IGNORE_INDEX).to(device)

            def logits_at(
                model: Any, ids: Any = ids, mask: Any = mask, answer: Any = answer
            ) -> Any:
                out = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size]
                return out[answer]

            reference = logits_at(teacher)
            for name, student in students.items():
                results[name].add(reference, logits_at(student))
    return {name: agreement.summary() for name, agreement in results.items()}
