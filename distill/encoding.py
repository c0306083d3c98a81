"""Rows into token ids, the same way for training and evaluation.

Each sequence is exactly the prompt the teacher saw (``distill.records.render_prompt``, in the
style the labeller recorded) followed by the teacher's answer and the end-of-sequence token;
labels mask the prompt, so a loss or a perplexity covers only the answer. ``distill.train`` and
``distill.evaluate`` both take their encoding from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.records import PROMPT_STYLES, Record, read_many, render_prompt

IGNORE_INDEX = -100


class DataError(ValueError):
    """Labelled rows that cannot be encoded (the CLI reports it as bad input)."""


@dataclass
class Example:
    """One tokenized training sequence: prompt and answer ids, loss on the answer only."""

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def read_labelled(paths: Sequence[Path]) -> list[Record]:
    """Every labelled row, validated; rows without an answer are all listed in one error."""
    records = read_many(list(paths))
    unanswered = [r for r in records if not (r.assistant or "").strip()]
    if unanswered:
        shown = ", ".join(f"{r.where} ({r.id})" for r in unanswered[:10])
        more = f" and {len(unanswered) - 10} more" if len(unanswered) > 10 else ""
        raise DataError(
            f"{len(unanswered)} row(s) have no assistant answer (label them first): {shown}{more}"
        )
    return records


def row_style(record: Record, requested: str, tokenizer: Any) -> str:
    """The prompt style of one row: the flag, else what the labeller recorded, else the default."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested != "auto":
        style = requested
    else:
        labeller = (record.metadata.get("provenance") or {}).get("labeller") or {}
        style = labeller.get("prompt_style")
        if style not in PROMPT_STYLES:
            style = "chat" if has_template else "plain"
    if style == "chat" and not has_template:
        raise DataError(
            f"{record.where}: row labelled with the chat style but the student's tokenizer has "
            "no chat template (pass --prompt-style plain to override)"
        )
    return style


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids as generation sees them: the tokenizer's specials unless the text has its BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=special)["input_ids"])


def encode_record(record: Record, style: str, tokenizer: Any, max_length: int) -> Example | None:
    """``render_prompt`` + answer + EOS as ids, labels masked on the prompt; None if no room."""
    prompt = render_prompt(record, style, tokenizer)  # type: ignore[arg-type]
    answer = record.assistant or ""
    prompt_ids = encode_prompt(tokenizer, prompt)
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and prompt.startswith(bos))
    full = list(tokenizer(prompt + answer, add_special_tokens=special)["input_ids"])
    # Tokenizing the whole text keeps the answer's first token as it reads after the prompt;
    # when a merge crosses the boundary, the answer is tokenized on its own instead.
    if full[: len(prompt_ids)] == prompt_ids:
        answer_ids = full[len(prompt_ids) :]
    else:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return Example(
        id=record.id,
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        truncated=truncated,
    )


def encode_record_with_ids(
    record: Record, style: str, tokenizer: Any, answer_ids: Sequence[int], max_length: int
) -> Example | None:
    """``render_prompt`` + exactly ``answer_ids`` (the teacher's tokens); None if no room.

    Unlike :func:`encode_record` the answer is not re-tokenized and no end-of-sequence token is
    added: position ``i`` of the answer is the teacher's token ``i``, so anything stored per
    generated token (its top-K log-probabilities) lines up. The ids must spell the row's answer
    (special tokens aside), else a :class:`DataError` names the row.
    """
    answer_ids = [int(i) for i in answer_ids]
    spelled = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    if spelled != (record.assistant or "").strip():
        raise DataError(
            f"{record.where}: the teacher's token ids spell {_clip(spelled)!r}, not the row's "
            f"answer {_clip(record.assistant or '')!r} (answer edited after labelling, or "
            "another tokenizer)"
        )
    prompt = render_prompt(record, style, tokenizer)  # type: ignore[arg-type]
    prompt_ids = encode_prompt(tokenizer, prompt)
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return Example(
        id=record.id,
        input_ids=prompt_ids + answer_ids[:room],
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids[:room],
        truncated=len(answer_ids) > room,
    )


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_all(
    records: Sequence[Record],
    tokenizer: Any,
    requested_style: str,
    max_length: int,
    encode: Callable[[Record, str, Any, int], Example | None] = encode_record,
) -> tuple[list[Example], dict[str, Any]]:
    """Encode rows with ``encode``; return the examples and counts (styles, truncated, dropped)."""
    examples: list[Example] = []
    styles: dict[str, int] = {}
    dropped: list[str] = []
    for record in records:
        style = row_style(record, requested_style, tokenizer)
        styles[style] = styles.get(style, 0) + 1
        example = encode(record, style, tokenizer, max_length)
        if example is None:
            dropped.append(record.id)
        else:
            examples.append(example)
    stats = {
        "rows": len(records),
        "sequences": len(examples),
        "styles": styles,
        "truncated": sum(e.truncated for e in examples),
        "dropped_prompt_too_long": dropped,
        "tokens": sum(len(e.input_ids) for e in examples),
        "answer_tokens": sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples),
    }
    return examples, stats


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token (its unk, else its eos) when it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise DataError("the tokenizer has no pad, unk or eos token to pad with")


def pad_examples(examples: Sequence[Example], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ``(input_ids, labels, attention_mask)`` tensors of a batch of examples."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return ids, labels, mask


@dataclass(frozen=True)
class SplitHead:
    """A causal LM as its decoder and its output layer, for logits at chosen positions only.

    Only the answer's positions carry a loss, yet a model's forward projects every position
    onto the vocabulary: with SmolLM2's 49k tokens that projection is a third of a CPU step's
    forward, and three quarters of the positions of the demo's padded batches are prompt or
    padding. :func:`split_head` checks that ``head(decoder(x))`` is the model's own forward.
    Training (``distill.train.losses``) and the eval's teacher-forced passes both use it.
    """

    decoder: Any
    head: Any


def split_head(model: Any) -> SplitHead | None:
    """The model's decoder and output layer when together they give its logits, else None.

    Checked on a short probe in eval mode: a model whose forward does more than project the
    last hidden state (logit soft-capping or scaling) gets None, and trains on full logits.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    device = next(model.parameters()).device
    probe = (torch.arange(3, 19, device=device) % base.config.get_text_config().vocab_size)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=probe).logits.float()
            split = head(decoder(input_ids=probe).last_hidden_state).float()
    except (TypeError, AttributeError, ValueError, RuntimeError):
        return None
    finally:
        model.train(was_training)
    if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-4, atol=1e-5):
        return None
    return SplitHead(decoder, head)


def answer_logits(model: Any, inputs: dict[str, Any], where: Any, split: SplitHead | None) -> Any:
    """Next-token logits [N, V] at ``where`` (bool [B, L - 1]: position t predicts token t + 1)
    of the model's ``inputs`` (input ids, and an attention mask or packed position ids),
    through ``split`` when given (the output layer at those positions only)."""
    if split is None:
        return model(**inputs).logits[:, :-1][where]
    return split.head(answer_hidden(split, inputs, where))


def answer_hidden(split: SplitHead, inputs: dict[str, Any], where: Any) -> Any:
    """The decoder's last hidden states [N, H] at ``where`` (as :func:`answer_logits`)."""
    return split.decoder(**inputs).last_hidden_state[:, :-1][where]


def answer_perplexity(
    model: Any, examples: Sequence[Any], pad_id: int, batch_size: int = 4
) -> float | None:
    """Perplexity of the answer tokens (labels not -100) under ``model``; None without examples."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    try:
        split = split_head(model)
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                ids, labels, mask = pad_examples(examples[start : start + batch_size], pad_id)
                target = labels[:, 1:].to(device)
                where = target != IGNORE_INDEX
                inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                logits = answer_logits(model, inputs, where, split)
                nll = torch.nn.functional.cross_entropy(
                    logits.float(), target[where], reduction="sum"
                )
                total_nll += float(nll)
                total_tokens += int(where.sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return None
    return round(math.exp(total_nll / total_tokens), 4)
