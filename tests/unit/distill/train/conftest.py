"""Labelled rows with the teacher's top-K log-probabilities, made from the tiny model itself.

The "teacher" is the tiny model at a low temperature (its logits divided by ``TEACHER_TEMP``):
same vocabulary as the student, a sharper distribution, so a student trained by distillation has
something to learn and its KL to the targets can fall. Its answers are generated greedily with
the end-of-sequence token held back for the first tokens (so every answer has text), and the
distribution stored at each token is the one it was picked from, after that rule, as the
labeller stores it (see ``distill.logprobs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

TEACHER_TEMP = 0.1
TOP_K = 8
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def prompt_rows(n: int, heldout_every: int = 4) -> list[dict[str, Any]]:
    """Unlabelled rows in the chat style, every ``heldout_every``-th held out."""
    rows = []
    for i in range(n):
        heldout = heldout_every and i % heldout_every == heldout_every - 1
        rows.append(
            {
                "id": f"r{i:02d}",
                "system_hint": "Réponds en québécois.",
                "user": "Salut! " + "Comment ça va? " * (i % 3 + 1) + f"({i})",
                "requires_json": False,
                "json_schema": None,
                "split": "heldout" if heldout else "train",
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "test", "labeller": {"prompt_style": "chat"}},
                },
            }
        )
    return rows


def teacher_answer(model: Any, tokenizer: Any, prompt_ids: list[int], new_tokens: int,
                   k: int = TOP_K, min_tokens: int = 4) -> Any:  # fmt: skip
    """Greedy tokens of the sharpened tiny model and its top-K log-probabilities at each."""
    import numpy as np
    import torch

    from distill.logprobs import TokenLogprobs

    ids = list(prompt_ids)
    tokens, tops, logps = [], [], []
    special = [i for i in tokenizer.all_special_ids if i is not None]
    with torch.no_grad():
        for step in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / TEACHER_TEMP
            if step < min_tokens:
                logits[special] = float("-inf")  # as a min-new-tokens processor would
            logp = torch.log_softmax(logits, -1)
            top = torch.topk(logp, k)
            token = int(top.indices[0])
            tokens.append(token)
            tops.append(top.indices.numpy().astype(np.int32))
            logps.append(top.values.numpy().astype(np.float32))
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
    return TokenLogprobs(np.array(tokens, np.int32), np.stack(tops), np.stack(logps))


def write_kd_labelled(path: Path, model_dir: Path, n: int = 12, new_tokens: int = 10,
                      with_logprobs: Any = lambda i: True) -> Path:  # fmt: skip
    """``path`` (and its sidecar): rows answered by the sharpened teacher, with its top-K."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.encoding import encode_prompt
    from distill.logprobs import FIELD, append_blocks, sidecar_path, vocab_hash
    from distill.records import Record, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = prompt_rows(n)
    blocks = []
    for row in rows:
        record = Record(**{k: row[k] for k in ("id", "system_hint", "user", "requires_json",
                                              "json_schema", "metadata", "split")})  # fmt: skip
        prompt_ids = encode_prompt(tokenizer, render_prompt(record, "chat", tokenizer))
        block = teacher_answer(model, tokenizer, prompt_ids, new_tokens)
        blocks.append(block)
        row["assistant"] = tokenizer.decode(block.token_ids.tolist(), skip_special_tokens=True)
        row["metadata"]["provenance"]["labeller"]["vocab_hash"] = vocab_hash(tokenizer)
    keep = [i for i in range(n) if with_logprobs(i)]
    refs = append_blocks(sidecar_path(path), [blocks[i] for i in keep])
    for i, ref in zip(keep, refs, strict=True):
        rows[i][FIELD] = ref
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def kd_data(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve rows (three held out), every one with the teacher's top-8 log-probabilities."""
    return write_kd_labelled(tmp_path_factory.mktemp("kd") / "labelled.jsonl", tiny_model)


@pytest.fixture(scope="session")
def sharp_teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its output layer scaled by 1 / TEACHER_TEMP: the kd_data teacher."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharp")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1 / TEACHER_TEMP)
    model.save_pretrained(out)
    return out
