"""What the eval measures on: the held-out rows, the models (teacher, student before and after),
and the check that teacher and student share one vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.encoding import ensure_pad_token, read_labelled
from distill.evaluate.args import EvalArgs, EvalError
from distill.records import Record


def run_record(run_dir: Path) -> dict[str, Any]:
    """The run's ``training_record.json`` (empty when the run has none)."""
    path = run_dir / "training_record.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def heldout_rows(args: EvalArgs, record: dict[str, Any]) -> list[Record]:
    """The held-out rows of ``--data`` (else of the run's training data), at most max_prompts."""
    paths = args.data or [Path(d["path"]) for d in record.get("data", [])]
    if not paths:
        raise EvalError("no labelled data: pass --data (the run record lists none)")
    rows = [r for r in read_labelled(paths) if r.split == "heldout"]
    if not rows:
        raise EvalError(f"no held-out rows (split: heldout) in {', '.join(map(str, paths))}")
    return rows[: args.max_prompts] if args.max_prompts else rows


def base_dir(run_dir: Path, record: dict[str, Any]) -> Path | None:
    """The student before training: ``<run>/base``, else the base model the record names."""
    if (run_dir / "base" / "config.json").is_file():
        return run_dir / "base"
    path = (record.get("base") or {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def pick_device(requested: str) -> str:
    """``auto`` is CUDA when there is one, else the CPU."""
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path, device: str) -> tuple[Any, Any]:
    """An HF causal LM in float32, in eval mode, and its tokenizer (given a pad token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    return model, tokenizer


def check_same_vocab(teacher: Any, student: Any, teacher_name: str, student_name: str) -> int:
    """The shared vocabulary's size; a clear error naming both models when they differ.

    Agreement and KL compare distributions token by token: they mean something only when token
    ``i`` is the same string for both models.
    """
    theirs, ours = teacher.get_vocab(), student.get_vocab()
    if theirs == ours:
        return len(ours)
    differing = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])
    example = ""
    if differing:
        token, index = differing[0]
        example = f"; first difference at id {index}: {token!r}"
    raise EvalError(
        f"the teacher {teacher_name} ({len(theirs)} tokens) and the student {student_name} "
        f"({len(ours)} tokens) do not share a vocabulary{example}: agreement and KL need the "
        "same tokenizer (pass the student's own teacher with --teacher)"
    )
