"""The eval stage in order: load, compare with the teacher in HF, generate, GGUF, write."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from distill.argspec import describe
from distill.evaluate.agreement import TEACHER, teacher_forced
from distill.evaluate.answers import answer_scores, generate, json_rates, prompt_ids
from distill.evaluate.args import EvalArgs, EvalError
from distill.evaluate.heldout import (
    base_dir,
    check_same_vocab,
    heldout_rows,
    load_model,
    pick_device,
    run_record,
)
from distill.records import atomic_write_json

log = logging.getLogger(__name__)


def run(args: EvalArgs) -> dict[str, Any]:
    """Measure, write ``eval.json`` and the model card's table; return the summary."""
    from distill.card_model import write_model_card
    from distill.encoding import encode_all
    from distill.models import resolve_model

    started = time.perf_counter()
    log.info("eval config: %s", json.dumps(describe(args), ensure_ascii=False))
    model_dir = args.run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: no merged model (run distill train first)")
    record = run_record(args.run_dir)
    rows = heldout_rows(args, record)
    device = pick_device(args.device)
    teacher_dir, teacher_source = resolve_model(args.teacher, revision=args.teacher_revision)
    teacher_name = str(teacher_source.get("name") or teacher_dir)

    # The models: the teacher, and the student before (when its base is found) and after.
    student, tokenizer = load_model(model_dir, device)
    teacher, teacher_tokenizer = load_model(teacher_dir, device)
    vocab_size = check_same_vocab(teacher_tokenizer, tokenizer, teacher_name, str(model_dir))
    students = {"after": student}
    paths = {"after": model_dir}
    base = base_dir(args.run_dir, record)
    if base is not None:
        base_model, base_tokenizer = load_model(base, device)
        check_same_vocab(teacher_tokenizer, base_tokenizer, teacher_name, str(base))
        students = {"before": base_model, "after": student}
        paths["before"] = base
    max_length = (record.get("config") or {}).get("max_length", 1024)
    examples, stats = encode_all(rows, tokenizer, "auto", max_length)
    pad = tokenizer.pad_token_id

    # Teacher-forced along the teacher's answers: agreement, KL, perplexities.
    forced = teacher_forced(teacher, students, examples, pad, vocab_size, args.batch_size)
    compared: dict[str, dict[str, Any]] = {
        name: {"model": str(paths[name]), **forced[name]} for name in students
    }
    json_rows = [r for r in rows if r.requires_json and r.json_schema is not None]
    teacher_json = json_rates(
        [r.assistant or "" for r in json_rows], [r.json_schema for r in json_rows]
    )
    result: dict[str, Any] = {
        "heldout": {
            "rows": len(rows),
            "sequences": stats["sequences"],
            "answer_tokens": stats["answer_tokens"],
            "truncated": stats["truncated"],
            "json_rows": len(json_rows),
        },
        "device": device,
        "teacher": {
            "model": teacher_name,
            "revision": teacher_source.get("revision"),
            "path": str(teacher_dir),
            "vocab_size": vocab_size,
            "answer_perplexity": forced[TEACHER]["answer_perplexity"],
            "json": teacher_json,
            "note": "the teacher's answers are the labelled ones (labelling may have retried "
            "or constrained them)",
        },
        "student_vs_teacher": compared,
    }
    del teacher
    after, before = compared["after"], compared.get("before")
    if before and before["answer_perplexity"] and after["answer_perplexity"]:
        after["perplexity_below_before"] = after["answer_perplexity"] < before["answer_perplexity"]
    log.info("teacher-forced: %s", json.dumps(compared))

    if args.answers:
        for name, model in students.items():
            compared[name].update(_answers(args, model, tokenizer, rows, json_rows))
            log.info(
                "%s: chrF %s, exact %s", name, compared[name]["chrf"], compared[name]["exact_match"]
            )
    del students, student
    if args.gguf_dir is not None:
        from distill.evaluate.gguf import eval_ggufs

        result.update(eval_ggufs(args, rows, tokenizer, model_dir, teacher_dir, teacher_source))

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
    return summarize(evaluation, str(args.run_dir / "eval.json"))


def _answers(
    args: EvalArgs, model: Any, tokenizer: Any, rows: list[Any], json_rows: list[Any]
) -> dict[str, Any]:
    """chrF and exact match of the greedy answers; JSON rates, free and constrained."""
    prompts = prompt_ids(rows, tokenizer)
    answers = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    out: dict[str, Any] = answer_scores(answers, [r.assistant or "" for r in rows])
    by_id = dict(zip((r.id for r in rows), answers, strict=True))
    schemas = [r.json_schema for r in json_rows]
    json_out: dict[str, Any] = {"free": json_rates([by_id[r.id] for r in json_rows], schemas)}
    if args.json_check and json_rows:
        from distill.constrain import SchemaConstraint

        constraint = SchemaConstraint(tokenizer, model.config.vocab_size)
        held = generate(
            model,
            tokenizer,
            prompt_ids(json_rows, tokenizer),
            args.max_new_tokens,
            args.batch_size,
            schemas=schemas,
            constraint=constraint,
        )
        json_out["constrained"] = json_rates(held, schemas)
        json_out["constrained_answers"] = {
            r.id: a[:300] for r, a in zip(json_rows, held, strict=True)
        }
    out["json"] = json_out
    out["answers"] = {r.id: a[:300] for r, a in zip(rows, answers, strict=True)}
    return out


def summarize(evaluation: dict[str, Any], path: str) -> dict[str, Any]:
    """The stage's one-line JSON summary: the headline numbers of ``eval.json``."""
    compared = evaluation.get("student_vs_teacher") or {}
    summary: dict[str, Any] = {"eval_json": path}
    for name in ("before", "after"):
        side = compared.get(name) or {}
        summary[name] = {
            key: side.get(key)
            for key in ("answer_perplexity", "top1_agreement", "mean_kl", "chrf", "exact_match")
        }
        js = side.get("json") or {}
        for mode in ("free", "constrained"):
            if js.get(mode):
                summary[name][f"schema_valid_{mode}"] = js[mode]["schema_valid"]
    summary["teacher_answer_perplexity"] = (evaluation.get("teacher") or {}).get(
        "answer_perplexity"
    )
    summary["perplexity_dropped"] = (compared.get("after") or {}).get("perplexity_below_before")
    for key in ("gguf", "teacher_ceiling"):
        quants = (evaluation.get(key) or {}).get("quants") or {}
        summary[key] = {
            q: {m: s.get(m) for m in ("mean_kld", "same_top_p", "ppl_ratio")}
            for q, s in quants.items()
        }
    summary["goal_met"] = (evaluation.get("goal") or {}).get("met")
    summary["wall_seconds"] = evaluation.get("wall_seconds")
    return summary
