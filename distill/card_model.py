"""The student's model card: ``<run>/model/README.md``, written by ``distill train``.

    distill train --data labelled.jsonl --output runs/demo/train   # writes the card
    distill eval --run-dir runs/demo/train --gguf-dir runs/demo/dist  # adds the eval table

The card says what the model is (base, student init, method, hyperparameters, data with hashes,
versions) from the run's ``training_record.json``, and how faithful it is from ``eval.json``.
It is rebuilt whole each time, so it never mixes two runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HYPERPARAMETERS = (
    "method",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "epochs",
    "max_steps",
    "grad_accum",
    "max_length",
    "seed",
    "init_from_teacher_every",
    "init_layers",
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def eval_table(evaluation: dict[str, Any] | None) -> str:
    """The eval results as Markdown tables (a placeholder line before ``distill eval`` ran)."""
    if not evaluation:
        return "Not evaluated yet: run `distill eval --run-dir <run> --gguf-dir <dist>`.\n"
    ppl = evaluation.get("perplexity") or {}
    lines = [
        f"Held-out rows: {evaluation.get('heldout_rows')}.",
        "",
        "| measure | value | goal |",
        "| --- | --- | --- |",
        f"| answer perplexity before training | {_num(ppl.get('before'))} | |",
        f"| answer perplexity after training | {_num(ppl.get('after'))} | below before |",
    ]
    js = evaluation.get("json")
    if js:
        lines.append(f"| JSON-valid rate, student ({js['rows']} rows) | "
                     f"{_pct(js['student_valid_rate'])} | |")  # fmt: skip
        lines.append(f"| JSON-valid rate, teacher ({js['rows']} rows) | "
                     f"{_pct(js['teacher_valid_rate'])} | |")  # fmt: skip
    gguf = evaluation.get("gguf")
    if gguf:
        goal = gguf.get("goal") or {}
        for quant in gguf.get("quants", []):
            if quant["quant"] == goal.get("quant"):
                lines.append(
                    f"| {quant['quant']} vs HF next-token top-1 agreement | "
                    f"{_pct(quant.get('top1_agreement'))} | "
                    f"at least {_pct(goal.get('top1_agreement_at_least'))} |"
                )
        lines += [
            "",
            f"GGUF files (llama.cpp perplexity over the held-out text, chunks of "
            f"{gguf.get('perplexity_ctx')} tokens; top-1 agreement with the merged HF model over "
            f"{gguf.get('tokens_per_prompt')} greedy tokens per prompt):",
            "",
            "| file | MiB | perplexity | top-1 agreement |",
            "| --- | --- | --- | --- |",
            f"| merged HF model (float32) | | {_num(gguf.get('hf_perplexity'))} | 100% |",
        ]
        for quant in gguf.get("quants", []):
            lines.append(
                f"| {quant['file']} | {quant['mib']} | {_num(quant.get('perplexity'))} | "
                f"{_pct(quant.get('top1_agreement'))} |"
            )
    return "\n".join(lines) + "\n"


def render_card(record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The whole card from a training record and, when there is one, an evaluation."""
    config = record.get("config") or {}
    base = record.get("base") or {}
    source = base.get("base") or {}
    metrics = record.get("metrics") or {}
    device = record.get("device") or {}
    base_name = source.get("name") or config.get("base_model") or "unknown"
    front = [
        "---",
        f"base_model: {base_name}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [pidistill, distillation, " + str(config.get("method", "lora")) + "]",
        "---",
        "",
        "# pidistill student",
        "",
        f"Distilled from `{base_name}` (revision `{source.get('revision')}`) on the teacher's "
        "answers with `distill train`; adapters merged into the full-precision base.",
        "",
        "## Base and student init",
        "",
    ]
    if base.get("layers_kept"):
        front.append(
            f"Student initialised from the base by keeping one decoder layer in "
            f"{base.get('every')}: {len(base['layers_kept'])} of {base.get('layers_of')} "
            f"(layers {', '.join(map(str, base['layers_kept']))})."
        )
    else:
        front.append("All decoder layers of the base kept.")
    front += ["", "## Data", "", "| file | sha256 | rows | train | held out |"]
    front.append("| --- | --- | --- | --- | --- |")
    for item in record.get("data", []):
        front.append(
            f"| {item['path']} | `{item['sha256'][:16]}…` | {item['rows']} | {item['train']} | "
            f"{item['heldout']} |"
        )
    train_data = record.get("train_data") or {}
    front += [
        "",
        f"Training sequences: {train_data.get('sequences')} ({train_data.get('tokens')} tokens, "
        f"{train_data.get('answer_tokens')} answer tokens with loss, "
        f"{train_data.get('truncated')} truncated); prompt styles {train_data.get('styles')}. "
        "Each sequence is the labelling prompt followed by the teacher's answer; the loss covers "
        "the answer only.",
        "",
        "## Method and hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in HYPERPARAMETERS:
        if key in config:
            front.append(f"| {key} | {_num(config[key])} |")
    front += [
        f"| device | {device.get('device')} ({device.get('dtype')}) |",
        f"| batch size | {device.get('batch_size')} |",
        f"| packing | {device.get('packing')} |",
        f"| merged model dtype | {(record.get('merge') or {}).get('save_dtype')} |",
        "",
        f"Trained {metrics.get('steps')} steps, "
        f"final training loss {_num(metrics.get('train_loss'))}"
        f", {_num(metrics.get('tokens_per_second'))} tokens/s; "
        f"merge check: max |logit difference| adapter vs merged "
        f"{_num((record.get('merge') or {}).get('max_abs_logit_diff'))}.",
        "",
        "## Evaluation",
        "",
        eval_table(evaluation).rstrip("\n"),
        "",
        "## Versions",
        "",
        "| package | version |",
        "| --- | --- |",
    ]
    for name, version in (record.get("versions") or {}).items():
        front.append(f"| {name} | {version} |")
    front += [
        "",
        "The run's `training_record.json` holds the full configuration and data hashes.",
        "",
    ]
    return "\n".join(front)


def write_model_card(
    model_dir: Path, record: dict[str, Any], evaluation: dict[str, Any] | None = None
) -> Path:
    """Write ``README.md`` into the model directory; return its path."""
    from distill.records import atomic_write_text

    path = Path(model_dir) / "README.md"
    atomic_write_text(path, render_card(record, evaluation))
    return path
