"""The training objectives: cross-entropy on the teacher's answer, and KL to its top-K distribution.

The teacher's answers come with its top K candidates and their log-probabilities at each
generated token (:mod:`distill.logprobs`); the rest of its mass, ``1 - sum(exp)``, is one more
bin. The student is compared over the same K + 1 bins: its log-probabilities of the K ids and the
log-sum-exp of every other id, so the KL needs neither the teacher's full vocabulary nor a guess
at how the tail spreads. A temperature T softens both: the teacher's bin log-probabilities and
the student's logits are divided by T (the teacher's bins renormalised) and the KL is multiplied
by T² so its gradients keep their size across temperatures (Hinton et al., 2015).

Alignment: a batch carries ``teacher_ids`` and ``teacher_logprobs`` [B, L, K] at the positions
of the tokens they describe, like ``labels``; logits at position t predict token t + 1, so both
are shifted by one inside the loss. A position without targets has ids -1 in every slot; a slot
past a row's K (rows of different K in one batch) has id -1 too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.encoding import IGNORE_INDEX, SplitHead, answer_hidden, answer_logits


def topk_kl(student_logits: Any, top_ids: Any, top_logprobs: Any, temperature: float = 1.0) -> Any:
    """KL(teacher || student) over the teacher's K candidates plus a rest bin, per position.

    ``student_logits`` [N, V]; ``top_ids`` [N, K] (-1: no candidate in that slot); ``top_logprobs``
    [N, K], natural log. Returns [N], not yet scaled by T²; a row without any candidate gets a
    finite value the caller must mask out.
    """
    import torch

    valid = top_ids >= 0
    # An empty slot points at the row's first candidate: scattering or gathering it is harmless.
    # A row without any (its KL is masked out by the caller) points at token 0.
    ids = torch.where(valid, top_ids, top_ids[:, :1]).clamp_min(0).long()
    teacher = top_logprobs.float().masked_fill(~valid, float("-inf"))
    rest = (1.0 - teacher.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    teacher_bins = torch.cat([teacher, rest.log()], dim=-1) / temperature
    teacher_log = torch.log_softmax(teacher_bins, dim=-1)

    z = student_logits.float() / temperature
    total = torch.logsumexp(z, dim=-1, keepdim=True)
    student_top = z.gather(-1, ids) - total
    others = z.scatter(-1, ids, float("-inf"))
    student_rest = torch.logsumexp(others, dim=-1, keepdim=True) - total
    student_log = torch.cat([student_top.masked_fill(~valid, 0.0), student_rest], dim=-1)

    p = teacher_log.exp()
    # Bins the teacher gives no mass (empty slots, a rest of zero) add nothing: 0 * log 0 = 0.
    terms = torch.where(p > 0, p * (teacher_log - student_log), torch.zeros_like(p))
    return terms.sum(-1)


CHUNK_LOGITS = 2**26
"""Logits a chunk of answer positions may hold at once (256 MiB in float32): past it the output
layer runs chunk by chunk, each chunk's logits recomputed in the backward pass instead of kept
(151,936 vocabulary entries: 441 positions a chunk; the demo's 49,152: 1,365, so its batches of
eight rows never chunk)."""


@dataclass(frozen=True)
class Objective:
    """What the training step minimises: ``sft``, ``kd`` or ``mix`` (see :mod:`.losses`)."""

    loss: str = "sft"
    temperature: float = 1.0
    weight: float = 0.5
    chunk_logits: int = CHUNK_LOGITS

    @property
    def uses_teacher(self) -> bool:
        """Whether batches must carry the teacher's targets."""
        return self.loss in ("kd", "mix")

    def __call__(
        self, model: Any, batch: dict[str, Any], split: SplitHead | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """The loss of one batch and its parts (``ce``, ``kd``: detached tensors, for the logs).

        With ``split``, logits are computed only where a loss term needs them, in chunks of at
        most ``chunk_logits`` (:data:`CHUNK_LOGITS`). The parts stay tensors so that a step
        never waits for the device just to log them.
        """
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        if split is not None:
            labels = batch["labels"][:, 1:]
            ids = batch["teacher_ids"][:, 1:] if self.uses_teacher else None
            needed = labels != IGNORE_INDEX
            if ids is not None:
                targets = ids[..., 0] >= 0
                needed = targets if self.loss == "kd" else needed | targets
            hidden = answer_hidden(split, inputs, needed)
            lps = batch["teacher_logprobs"][:, 1:][needed] if ids is not None else None
            return self.from_hidden(
                hidden, split.head, labels[needed], ids[needed] if ids is not None else None, lps
            )
        if not self.uses_teacher:
            out = model(**batch)
            return out.loss, {"ce": out.loss.detach()}
        # No labels: the model returns logits (Liger's fused cross-entropy would skip them).
        logits = model(**inputs).logits
        return self.from_logits(
            logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"]
        )

    def from_logits(
        self, logits: Any, labels: Any, teacher_ids: Any, teacher_logprobs: Any
    ) -> tuple[Any, dict[str, Any]]:
        """The loss from logits [B, L, V] and targets at token positions [B, L(, K)]."""
        shifted = logits[:, :-1]
        labels = labels[:, 1:]
        ids = teacher_ids[:, 1:]
        needed = (labels != IGNORE_INDEX) | (ids[..., 0] >= 0)
        return self.from_positions(
            shifted[needed], labels[needed], ids[needed], teacher_logprobs[:, 1:][needed]
        )

    def from_positions(
        self, logits: Any, labels: Any, teacher_ids: Any = None, teacher_logprobs: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """The loss from the logits [N, V] of the positions that carry a term, and their targets:
        labels [N] (``IGNORE_INDEX``: no cross-entropy there), teacher ids and log-probabilities
        [N, K] (ids -1: no KD there). Each term is a mean over the positions it covers."""
        return self._combine(self._sums(logits, labels, teacher_ids, teacher_logprobs),
                             labels, teacher_ids)  # fmt: skip

    def from_hidden(
        self,
        hidden: Any,
        head: Any,
        labels: Any,
        teacher_ids: Any = None,
        teacher_logprobs: Any = None,
    ) -> tuple[Any, dict[str, Any]]:
        """:meth:`from_positions` from the decoder's hidden states [N, H] and its output layer:
        the logits of at most ``chunk_logits`` at a time, each chunk recomputed in the backward
        pass (activation checkpointing), so that [N, V] is never held whole."""
        from torch.utils.checkpoint import checkpoint

        vocab = int(head.weight.shape[0])
        size = max(1, self.chunk_logits // vocab)
        count = int(hidden.shape[0])
        if count <= size:
            return self.from_positions(head(hidden), labels, teacher_ids, teacher_logprobs)
        sums = None
        for start in range(0, count, size):
            part = slice(start, start + size)
            chunk = checkpoint(
                self._head_sums,
                hidden[part],
                head,
                labels[part],
                teacher_ids[part] if teacher_ids is not None else None,
                teacher_logprobs[part] if teacher_logprobs is not None else None,
                use_reentrant=False,
            )
            sums = chunk if sums is None else sums + chunk
        return self._combine(sums, labels, teacher_ids)

    def _head_sums(
        self, hidden: Any, head: Any, labels: Any, teacher_ids: Any, teacher_logprobs: Any
    ) -> Any:
        return self._sums(head(hidden), labels, teacher_ids, teacher_logprobs)

    def _sums(self, logits: Any, labels: Any, teacher_ids: Any, teacher_logprobs: Any) -> Any:
        """[KL summed over the positions with teacher targets, cross-entropy summed over the
        labelled ones], by masks rather than selections, so that no step waits on the device
        to count positions; a term with no position is a zero that keeps the graph."""
        import torch

        kd = ce = logits.sum() * 0.0
        if self.uses_teacher:
            has_target = teacher_ids[:, 0] >= 0
            kl = topk_kl(logits, teacher_ids, teacher_logprobs, self.temperature)
            kd = torch.where(has_target, kl, torch.zeros_like(kl)).sum()
        if self.loss != "kd":
            ce = torch.nn.functional.cross_entropy(
                logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return torch.stack([kd, ce])

    def _combine(self, sums: Any, labels: Any, teacher_ids: Any) -> tuple[Any, dict[str, Any]]:
        """Each term's mean over the positions it covers, weighted and scaled."""
        parts: dict[str, Any] = {}
        kd = None
        if self.uses_teacher:
            covered = (teacher_ids[:, 0] >= 0).sum().clamp_min(1)
            kd = sums[0] / covered * self.temperature**2
            parts["kd"] = kd.detach()
            if self.loss == "kd":
                return kd, parts
        ce = sums[1] / (labels != IGNORE_INDEX).sum().clamp_min(1)
        parts["ce"] = ce.detach()
        if kd is None:
            return ce, parts
        return (1.0 - self.weight) * ce + self.weight * kd, parts


TARGET_KEYS = ("labels", "teacher_ids", "teacher_logprobs")


def teacher_kl(model: Any, batches: list[dict[str, Any]], temperature: float = 1.0) -> float | None:
    """Mean KL(teacher || student) per answer token with targets, over collated batches.

    Unscaled by T²; at T = 1 it is the KL the student is trained down. None without targets.
    """
    import torch

    from distill.encoding import split_head

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        split = split_head(model)
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                ids = batch["teacher_ids"][:, 1:]
                has_target = ids[..., 0] >= 0
                if not bool(has_target.any()):
                    continue
                inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
                logits = answer_logits(model, inputs, has_target, split)
                kl = topk_kl(
                    logits,
                    ids[has_target],
                    batch["teacher_logprobs"][:, 1:][has_target],
                    temperature,
                )
                total += float(kl.sum())
                count += int(kl.numel())
    finally:
        model.train(was_training)
    return round(total / count, 5) if count else None
