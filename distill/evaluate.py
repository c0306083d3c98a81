"""``distill eval``: how faithful the student is, to its teacher and in its GGUF files.

    distill eval --run-dir runs/demo/train --gguf-dir runs/demo/dist
    distill eval --run-dir runs/demo/train --data runs/demo/labelled/quebecois_distill.jsonl \\
        --max-prompts 20 --no-json-check

Measured on the held-out rows (``split: heldout``) of the labelled data (by default the files the
run was trained on, as its ``training_record.json`` lists them):

- perplexity of the teacher's answers under the student before training (``<run>/base`` or
  the base model) and after (``<run>/model``): it must drop;
- JSON-valid rate on ``requires_json`` rows: the student's greedy answers against the teacher's
  recorded ones (both checked with ``distill.records.check_json_answer``);
- for each GGUF in ``--gguf-dir`` (``distill export``'s ``manifest.json``): next-token top-1
  agreement with the merged HF model (llama-server decodes greedily from each prompt's tokens;
  the HF model, fed the same tokens, must pick the same next token; goal at least 99% for
  Q8_0) and llama.cpp's own perplexity (``llama-perplexity``) over the held-out text, beside
  the same measure computed by the HF model.

Results go to ``<run>/eval.json`` and, as a table, into the model card ``<run>/model/README.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.argspec import arg, describe

log = logging.getLogger(__name__)

AGREEMENT_GOAL = 0.99
# llama.cpp's weight repacking picks the AMX buffer type on CPUs that report AMX; on VMs that do
# not grant AMX tile state, quantized models then crash (SIGSEGV at the first matmul). The eval
# runs on the workstation, where repacking buys nothing that matters, so it is always off here.
NO_REPACK = "--no-repack"


class EvalError(RuntimeError):
    """An evaluation step that could not run."""


@dataclass
class EvalArgs:
    """Arguments of ``distill eval``."""

    run_dir: Path = arg(help="training run directory (model/, training_record.json)")
    data: list[Path] | None = arg(
        None, help="labelled JSONL with held-out rows (default: the run's training data)"
    )
    gguf_dir: Path | None = arg(None, help="distill export's output directory (manifest.json)")
    agreement_quant: str = arg("Q8_0", help="the quant type whose agreement must reach 99%%")
    agreement_tokens: int = arg(32, help="tokens llama-server decodes per prompt for agreement")
    max_prompts: int | None = arg(None, help="use only the first N held-out rows")
    max_new_tokens: int = arg(192, help="most tokens the student generates per JSON answer")
    json_check: bool = arg(True, help="generate the student's JSON answers and check them")
    ppl_ctx: int = arg(256, help="llama-perplexity chunk size (lowered for little text)")
    threads: int | None = arg(None, help="CPU threads for llama.cpp tools")
    device: str = arg("auto", help="device of the HF models: auto, cpu, cuda")

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.gguf_dir is not None:
            self.gguf_dir = Path(self.gguf_dir)
        if self.data is not None:
            self.data = [Path(p) for p in self.data]
        for name in ("agreement_tokens", "max_new_tokens", "ppl_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.ppl_ctx < 16:
            raise ValueError(f"ppl_ctx: at least 16, got {self.ppl_ctx}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts: must be at least 1, got {self.max_prompts}")
        self.agreement_quant = self.agreement_quant.upper()


# ----------------------------------------------------------------------------- HF measures


def chunked_perplexity(model: Any, ids: Sequence[int], ctx: int, bos_id: int | None) -> float:
    """llama-perplexity's measure in HF: chunks of ``ctx`` tokens (BOS first when the vocabulary
    adds one), scoring only the second half of each chunk."""
    import torch

    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    first = ctx // 2
    with torch.no_grad():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            chunk = list(ids[start : start + ctx])
            if bos_id is not None:
                chunk[0] = bos_id
            tensor = torch.tensor([chunk], device=device)
            logits = model(input_ids=tensor).logits[0].float()
            logprobs = torch.log_softmax(logits[first : ctx - 1], dim=-1)
            targets = tensor[0, first + 1 : ctx]
            nll -= float(logprobs.gather(1, targets[:, None]).sum())
            count += ctx - 1 - first
    return round(math.exp(nll / count), 4)


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch: int = 8
) -> list[str]:
    """Greedy answers for prompt ids, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    answers: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def hf_argmax_along(model: Any, prompt: list[int], continuation: list[int]) -> list[int]:
    """The HF model's top-1 next token at each step of ``continuation`` after ``prompt``."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt + continuation], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    positions = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return [int(logits[p].argmax()) for p in positions]


# ----------------------------------------------------------------------------- llama.cpp


def llama_server(
    server: Path,
    model: Path,
    ctx: int,
    threads: int | None = None,
    timeout: float = 120.0,
    extra: Sequence[str] = (),
) -> contextlib.AbstractContextManager[str]:
    """Run ``llama-server`` on a GGUF for the duration of the block; yield its base URL.

    One slot, no weight repacking (the repacked CPU kernels are not the ones a Pi runs).
    """
    from distill.llamacpp import serve

    return serve(
        model,
        server=server,
        ctx_size=ctx,
        threads=threads,
        startup_timeout=timeout,
        extra=[NO_REPACK, *extra],
    )


def server_greedy(url: str, prompt: list[int], n_predict: int) -> tuple[list[int], str]:
    """llama-server's greedy continuation of prompt token ids: (token ids, stop type)."""
    import httpx

    response = httpx.post(
        url + "/completion",
        json={
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
            "samplers": ["top_k"],
        },
        timeout=300,
    )
    if response.status_code != 200:
        raise EvalError(f"llama-server /completion: HTTP {response.status_code}: {response.text}")
    body = response.json()
    return [int(t) for t in body.get("tokens", [])], str(body.get("stop_type", ""))


def llama_perplexity(
    tool: Path, model: Path, text_file: Path, ctx: int, threads: int | None
) -> float | None:
    """llama.cpp's perplexity of a text file (``Final estimate: PPL = ...``)."""
    from distill.llamacpp import run as run_tool

    cmd = [
        str(tool),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        NO_REPACK,
    ]
    if threads:
        cmd += ["-t", str(threads)]
    result = run_tool(cmd)
    output = result.stdout + "\n" + result.stderr
    found = re.search(r"Final estimate: PPL = (\S+)", output)
    # Without a spread (a non-finite or constant log-likelihood) there is no final estimate;
    # the running estimate after the last chunk ("[10]123.4,") is the same perplexity.
    running = re.findall(r"\[\d+\]([^,\s]+),", output)
    if not found and not running:
        tail = "\n".join(
            f"{name}: {line}"
            for name, text in (("stdout", result.stdout), ("stderr", result.stderr))
            for line in text.strip().splitlines()[-4:]
        )
        raise EvalError(f"{' '.join(cmd)}: no perplexity in its output:\n{tail}")
    shown = found.group(1) if found else running[-1]
    try:
        value = float(shown)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        # A barely trained model can overflow; JSON has no inf or nan, so report it as missing.
        log.warning("%s: perplexity is %s", model.name, shown)
        return None
    return round(value, 4)


# ----------------------------------------------------------------------------- the stage


def _load(path: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.encoding import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    return model, tokenizer


def _base_dir(run_dir: Path, record: dict[str, Any]) -> Path | None:
    if (run_dir / "base" / "config.json").is_file():
        return run_dir / "base"
    path = (record.get("base") or {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def _heldout(args: EvalArgs, record: dict[str, Any]) -> list[Any]:
    from distill.encoding import read_labelled

    paths = args.data or [Path(d["path"]) for d in record.get("data", [])]
    if not paths:
        raise EvalError("no labelled data: pass --data (the run record lists none)")
    rows = [r for r in read_labelled(paths) if r.split == "heldout"]
    if not rows:
        raise EvalError(f"no held-out rows (split: heldout) in {', '.join(map(str, paths))}")
    return rows[: args.max_prompts] if args.max_prompts else rows


def run(args: EvalArgs) -> dict[str, Any]:
    """Measure, write ``eval.json`` and the model card's table; return the summary."""
    import torch

    from distill.card_model import write_model_card
    from distill.encoding import answer_perplexity, encode_all, encode_prompt, row_style
    from distill.records import atomic_write_json, build_prompt, check_json_answer, render_prompt

    started = time.perf_counter()
    log.info("eval config: %s", json.dumps(describe(args), ensure_ascii=False))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    record_path = args.run_dir / "training_record.json"
    model_dir = args.run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: no merged model (run distill train first)")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    rows = _heldout(args, record)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    max_length = (record.get("config") or {}).get("max_length", 1024)
    result: dict[str, Any] = {"heldout_rows": len(rows), "device": device}

    # Perplexity of the teacher's answers, before and after training.
    student, tokenizer = _load(model_dir, device)
    examples, _ = encode_all(rows, tokenizer, "auto", max_length)
    after = answer_perplexity(student, examples, tokenizer.pad_token_id)
    before = None
    base = _base_dir(args.run_dir, record)
    if base is not None:
        base_model, _ = _load(base, device)
        before = answer_perplexity(base_model, examples, tokenizer.pad_token_id)
        del base_model
    result["perplexity"] = {
        "before": before,
        "after": after,
        "answer_tokens": sum(sum(1 for x in e.labels if x != -100) for e in examples),
        "dropped": None if before is None or after is None else after < before,
        "base": str(base) if base else None,
    }
    log.info("held-out answer perplexity: before %s, after %s", before, after)

    # JSON-valid rate, student against teacher.
    json_rows = [r for r in rows if r.requires_json and r.json_schema is not None]
    if args.json_check and json_rows:
        prompts = [
            encode_prompt(tokenizer, render_prompt(r, row_style(r, "auto", tokenizer), tokenizer))  # type: ignore[arg-type]
            for r in json_rows
        ]
        answers = generate_answers(student, tokenizer, prompts, args.max_new_tokens)
        per_row = []
        for row, answer in zip(json_rows, answers, strict=True):
            student_problem = check_json_answer(answer, row.json_schema or {})
            teacher_problem = check_json_answer(row.assistant or "", row.json_schema or {})
            per_row.append(
                {
                    "id": row.id,
                    "student_valid": student_problem is None,
                    "teacher_valid": teacher_problem is None,
                    "student_problem": student_problem,
                    "student_answer": answer[:500],
                }
            )
        n = len(per_row)
        result["json"] = {
            "rows": n,
            "student_valid_rate": round(sum(r["student_valid"] for r in per_row) / n, 4),
            "teacher_valid_rate": round(sum(r["teacher_valid"] for r in per_row) / n, 4),
            "note": "teacher answers are the labelled ones (labelling retried invalid JSON)",
            "per_row": per_row,
        }
        log.info(
            "JSON-valid rate: student %.1f%%, teacher %.1f%% (%d rows)",
            100 * result["json"]["student_valid_rate"],
            100 * result["json"]["teacher_valid_rate"],
            n,
        )

    # GGUF files: agreement with the HF model and llama.cpp perplexity.
    if args.gguf_dir is not None:
        plain_text = "\n\n".join(build_prompt(r) + (r.assistant or "") for r in rows) + "\n"
        result["gguf"] = _eval_ggufs(args, student, tokenizer, rows, plain_text)

    evaluation = {
        "stage": "eval",
        "config": describe(args),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **result,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(args.run_dir / "eval.json", evaluation)
    if record:
        write_model_card(model_dir, record, evaluation)
    summary: dict[str, Any] = {
        "eval_json": str(args.run_dir / "eval.json"),
        "perplexity_before": before,
        "perplexity_after": after,
        "perplexity_dropped": result["perplexity"]["dropped"],
    }
    if "json" in result:
        summary["json_valid_student"] = result["json"]["student_valid_rate"]
        summary["json_valid_teacher"] = result["json"]["teacher_valid_rate"]
    if "gguf" in result:
        summary["agreement"] = {
            q["quant"]: q.get("top1_agreement") for q in result["gguf"]["quants"]
        }
        summary["agreement_goal_met"] = result["gguf"].get("goal_met")
        summary["gguf_perplexity"] = {
            q["quant"]: q.get("perplexity") for q in result["gguf"]["quants"]
        }
    summary["wall_seconds"] = evaluation["wall_seconds"]
    return summary


def _eval_ggufs(
    args: EvalArgs, model: Any, tokenizer: Any, rows: Sequence[Any], plain_text: str
) -> dict[str, Any]:
    from distill.encoding import encode_prompt, row_style
    from distill.llamacpp import LlamaCppError, require_tools
    from distill.records import render_prompt

    assert args.gguf_dir is not None
    manifest_path = args.gguf_dir / "manifest.json"
    if not manifest_path.is_file():
        raise EvalError(f"{manifest_path}: missing (run distill export first)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind", "decoder") != "decoder":
        raise EvalError(f"{manifest_path}: a {manifest.get('kind')} export, not a causal LM")
    tools = require_tools()
    server = tools.tool("llama-server")
    try:
        perplexity_tool: Path | None = tools.tool("llama-perplexity")
    except LlamaCppError as err:
        log.warning("%s: GGUF perplexity skipped", err)
        perplexity_tool = None

    prompts = [
        encode_prompt(tokenizer, render_prompt(r, row_style(r, "auto", tokenizer), tokenizer))  # type: ignore[arg-type]
        for r in rows
    ]
    longest = max(len(p) for p in prompts) + args.agreement_tokens + 8
    server_ctx = 1 << max(8, math.ceil(math.log2(longest)))
    text_ids = tokenizer(plain_text)["input_ids"]
    adds_bos = bool(text_ids) and text_ids[0] == tokenizer.bos_token_id
    ppl_ctx = args.ppl_ctx
    while ppl_ctx > 16 and len(text_ids) < 2 * ppl_ctx:
        ppl_ctx //= 2
    out: dict[str, Any] = {
        "manifest": str(manifest_path),
        "prompts": len(prompts),
        "tokens_per_prompt": args.agreement_tokens,
        "perplexity_ctx": ppl_ctx,
        "perplexity_text_tokens": len(text_ids),
        "hf_perplexity": chunked_perplexity(
            model, text_ids, ppl_ctx, tokenizer.bos_token_id if adds_bos else None
        )
        if len(text_ids) >= 2 * ppl_ctx
        else None,
        "quants": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "heldout.txt"
        text_file.write_text(plain_text, encoding="utf-8")
        for entry in manifest.get("files", []):
            gguf = args.gguf_dir / entry["file"]
            row: dict[str, Any] = {
                "quant": entry["quant"],
                "file": entry["file"],
                "mib": round(entry["bytes"] / 2**20, 2),
            }
            agree = total = 0
            with llama_server(server, gguf, server_ctx, args.threads) as url:
                for prompt in prompts:
                    tokens, _stop = server_greedy(url, prompt, args.agreement_tokens)
                    if not tokens:
                        continue
                    reference = hf_argmax_along(model, prompt, tokens)
                    agree += sum(a == b for a, b in zip(reference, tokens, strict=True))
                    total += len(tokens)
            row["top1_agreement"] = round(agree / total, 4) if total else None
            row["agreement_tokens"] = total
            if perplexity_tool is not None and len(text_ids) >= 2 * ppl_ctx:
                row["perplexity"] = llama_perplexity(
                    perplexity_tool, gguf, text_file, ppl_ctx, args.threads
                )
            log.info("%s: %s", entry["file"], row)
            out["quants"].append(row)
    goal = [q for q in out["quants"] if q["quant"] == args.agreement_quant]
    out["goal"] = {"quant": args.agreement_quant, "top1_agreement_at_least": AGREEMENT_GOAL}
    out["goal_met"] = (goal[0].get("top1_agreement") or 0) >= AGREEMENT_GOAL if goal else None
    return out
