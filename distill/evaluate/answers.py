"""The student's own greedy answers, scored against the teacher's labelled ones.

- chrF (sacrebleu, corpus-level: character n-gram statistics summed over all rows before the
  F-score, so long answers weigh more) and exact match (after stripping whitespace);
- on ``requires_json`` rows, the JSON-valid rate (a JSON value can be found in the answer) and
  the schema-valid rate (that value satisfies the row's schema), for free generation and for
  generation held to the schema by xgrammar (:mod:`distill.constrain`).

Generation is greedy, batched with left padding, the prompts sorted by length so a batch pads
little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distill.encoding import encode_prompt, row_style
from distill.records import Record, check_json_answer, extract_json, render_prompt


def prompt_ids(rows: Sequence[Record], tokenizer: Any) -> list[list[int]]:
    """Each row's labelling prompt, in the style the labeller recorded, as generation ids."""
    return [
        encode_prompt(tokenizer, render_prompt(r, row_style(r, "auto", tokenizer), tokenizer))  # type: ignore[arg-type]
        for r in rows
    ]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    schemas: Sequence[Mapping[str, Any] | None] | None = None,
    constraint: Any = None,
) -> list[str]:
    """Greedy answers to prompt ids, in the prompts' order.

    With ``schemas`` (one per prompt, ``None`` for a free row) and a
    :class:`distill.constrain.SchemaConstraint`, each row is held to its schema.
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        chunk = [prompts[i] for i in picked]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        extra: dict[str, Any] = {}
        if schemas is not None and constraint is not None:
            extra["logits_processor"] = [constraint.processor([schemas[i] for i in picked])]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **extra,
            )
        for i, row in zip(picked, out[:, width:], strict=True):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [answers[i] for i in range(len(prompts))]


def answer_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus-level chrF (0-100) and the exact-match rate of answers against references."""
    from sacrebleu.metrics import CHRF

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return {"rows": 0, "chrf": None, "exact_match": None}
    exact = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
    return {
        "rows": len(answers),
        "chrf": round(CHRF().corpus_score(list(answers), [list(references)]).score, 2),
        "exact_match": round(exact / len(answers), 4),
    }


def json_rates(answers: Sequence[str], schemas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many answers hold a JSON value, and how many a value valid against their schema."""
    if not answers:
        return {"rows": 0, "json_valid": None, "schema_valid": None}
    parsed = schema_ok = 0
    for answer, schema in zip(answers, schemas, strict=True):
        try:
            extract_json(answer)
        except ValueError:
            continue
        parsed += 1
        schema_ok += check_json_answer(answer, schema) is None
    return {
        "rows": len(answers),
        "json_valid": round(parsed / len(answers), 4),
        "schema_valid": round(schema_ok / len(answers), 4),
    }
