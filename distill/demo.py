"""``make demo``: the main job end to end on the embedded defaults, one stage after another.

label -> dataset card -> train (a layer-dropped SmolLM2 student) -> export (GGUF) -> eval ->
a lab of stand-in Pis up -> ``site.yml`` (provision, deploy the student, bench) -> fleet report.

    make demo                       # settings from the environment or .env (see .env.example)
    DEMO_LIMIT=20 make demo         # a quicker pass over the first 20 rows of each file

Each stage runs as its own ``distill`` command, built by :mod:`distill.ops` (the same builders
the TUI uses), so what the demo does can be copied from its log and run by hand. Stages hand
off through files under ``DEMO_RUN_DIR`` (default ``runs/demo``); labelling resumes with
``--skip-existing``, so a second ``make demo`` only does what is left.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import ops

log = logging.getLogger("distill.demo")
ROOT = Path(__file__).resolve().parents[1]
INPUTS = ("dataset/quebecois_distill.jsonl", "dataset/quebecois_conversation.jsonl")


@dataclass
class Settings:
    """The demo's knobs, each read from an environment variable of the same upper-case name."""

    demo_run_dir: Path = Path("runs/demo")
    demo_teacher: str = ""
    demo_teacher_url: str = ""
    demo_limit: int = 0
    demo_batch_size: int = 16
    demo_max_new_tokens: int = 128
    demo_logprobs: int = 20
    demo_loss: str = "kd"
    demo_student_every: int = 2
    demo_student_layers: str = "ends"
    demo_learning_rate: float = 3e-3
    demo_method: str = "lora"
    demo_epochs: float = 3.0
    demo_quants: str = "Q8_0 Q4_K_M"
    demo_token_embedding_type: str = ""
    demo_fleet_size: int = 3

    def student(self) -> dict[str, Any]:
        """The ``distill train`` values that make the demo's student (the bench trains it too)."""
        return {
            "init_from_teacher_every": self.demo_student_every,
            "init_layers": self.demo_student_layers,
            "learning_rate": self.demo_learning_rate,
        }

    @classmethod
    def from_env(cls) -> Settings:
        """Read every knob; a malformed value fails with the variable's name."""
        settings = cls()
        for name, current in vars(cls()).items():
            value = os.environ.get(name.upper())
            if not value:
                continue
            try:
                setattr(settings, name, type(current)(value))
            except ValueError:
                kind = type(current).__name__
                raise SystemExit(f"demo: {name.upper()}={value!r}: expected {kind}") from None
        return settings


def run_stage(stage: str, **values: Any) -> dict[str, Any]:
    """Run one ``distill`` stage as a subprocess; return the JSON summary it prints."""
    command = ops.build(stage, program=str(Path(sys.executable).with_name("distill")), **values)
    log.info("$ %s", command.shell())
    started, cpu = time.perf_counter(), _children_cpu()
    result = subprocess.run(
        command.argv,
        env={**os.environ, **command.env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"demo: stage {stage} failed (exit {result.returncode}); see above")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    # CPU seconds tell the stage's cost apart from what else the machine was doing.
    summary["cpu_seconds"] = round(_children_cpu() - cpu, 1)
    TIMES.append((stage, summary["wall_seconds"], summary["cpu_seconds"]))
    return summary


TIMES: list[tuple[str, float, float]] = []  # (stage, wall, CPU seconds) of each run_stage


def _children_cpu() -> float:
    """User + system seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_table(times: list[tuple[str, float, float]]) -> str:
    """Where the demo's time went: wall and CPU minutes per stage, and the total."""
    lines = ["| stage | wall min | CPU min |", "| --- | ---: | ---: |"]
    for stage, wall, cpu in times:
        lines.append(f"| {stage} | {wall / 60:.1f} | {cpu / 60:.1f} |")
    wall, cpu = sum(t[1] for t in times), sum(t[2] for t in times)
    lines.append(f"| all stages | {wall / 60:.1f} | {cpu / 60:.1f} |")
    return "\n".join(lines)


def main() -> int:
    """Label, card, train, export, evaluate; print what was written where."""
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s", stream=sys.stderr)
    settings = Settings.from_env()
    run_dir = settings.demo_run_dir
    teacher: dict[str, Any] = {}
    if settings.demo_teacher_url:
        teacher["teacher_url"] = settings.demo_teacher_url
    elif settings.demo_teacher:
        teacher["teacher"] = settings.demo_teacher
    report: list[str] = []
    labelled = []
    for source in INPUTS:
        output = run_dir / "labelled" / Path(source).name
        summary = run_stage(
            "label",
            input=Path(source),
            output=output,
            skip_existing=True,
            batch_size=settings.demo_batch_size,
            max_new_tokens=settings.demo_max_new_tokens,
            logprobs=settings.demo_logprobs,
            limit=settings.demo_limit or None,
            **teacher,
        )
        labelled.append(output)
        report.append(
            f"label {Path(source).name}: {summary['labelled']} labelled, {summary['skipped']} "
            f"skipped, {summary['rejected']} rejected, {summary['tokens_per_second']} tok/s "
            f"-> {summary['output']} (rejects: {summary['rejects']})"
        )
    card = run_stage("card", input=labelled, output=run_dir / "DATASET_CARD.md")
    report.append(f"card: {card['rows']} rows -> {card['card']} (+ .json)")

    train_dir = run_dir / "train"
    train = run_stage(
        "train",
        data=labelled,
        output=train_dir,
        **settings.student(),
        method=settings.demo_method,
        loss=settings.demo_loss,
        epochs=settings.demo_epochs,
        resume=(train_dir / "checkpoints").is_dir() and not (train_dir / "model").is_dir(),
        overwrite=(train_dir / "model").is_dir(),
    )
    report.append(f"train: {_short(train)} -> {train_dir / 'model'}")
    dist = run_dir / "dist"
    export = run_stage(
        "export",
        model=train_dir / "model",
        output_dir=dist,
        name="student",
        quant=settings.demo_quants.split(),
        token_embedding_type=settings.demo_token_embedding_type or None,
        overwrite=True,
    )
    report.append(f"export: {_short(export)} -> {dist}")
    # The student's answers are compared with the teacher's, which stop at the same cap.
    run_stage("eval", run_dir=train_dir, gguf_dir=dist, max_new_tokens=settings.demo_max_new_tokens)
    report.append(f"eval: -> {train_dir / 'eval.json'} (and the model card's table)")
    if settings.demo_fleet_size > 0:
        started, cpu = time.perf_counter(), _children_cpu()
        report += _fleet(settings.demo_fleet_size, dist)
        TIMES.append(("fleet", time.perf_counter() - started, _children_cpu() - cpu))

    lines = ["", "pidistill demo: done", ""]
    lines += [f"  {line}" for line in report]
    lines += ["", _eval_table(train_dir / "eval.json"), "", time_table(TIMES)]
    print("\n".join(lines))  # noqa: T201 - the demo's closing report
    return 0


def _fleet(hosts: int, dist: Path) -> list[str]:
    """Lab up, ``site.yml`` (provision, deploy the student, bench), the fleet report's paths."""
    command = [sys.executable, str(ROOT / "scripts" / "fleet_demo.py"), "--hosts", str(hosts),
               "--model-dir", str(dist)]  # fmt: skip
    log.info("$ %s", " ".join(command))
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"demo: the fleet stage failed (exit {result.returncode}); see above")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _short(summary: dict[str, Any]) -> str:
    """The scalar fields of a stage summary, for one line of the report."""
    keep = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and k != "output"}
    return ", ".join(f"{k}={v}" for k, v in list(keep.items())[:8])


def _eval_table(eval_json: Path) -> str:
    """The fidelity numbers of ``eval.json`` as a small Markdown table."""
    data = json.loads(eval_json.read_text(encoding="utf-8"))
    compared = data.get("student_vs_teacher") or {}
    before, after = compared.get("before") or {}, compared.get("after") or {}
    teacher = data.get("teacher") or {}
    lines = [
        "| measure | teacher | student before | student after |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("answer_perplexity", "held-out answer perplexity"),
        ("top1_agreement", "top-1 agreement with the teacher"),
        ("mean_kl", "mean KL(teacher || student)"),
        ("chrf", "chrF vs the teacher's answers"),
        ("exact_match", "exact match"),
    ):
        ours = teacher.get(key, "") if key == "answer_perplexity" else ""
        lines.append(f"| {label} | {ours} | {before.get(key)} | {after.get(key)} |")
    for mode in ("free", "constrained"):
        sides = [(side.get("json") or {}).get(mode) or {} for side in (before, after)]
        if any(sides):
            labelled = (teacher.get("json") or {}).get("schema_valid", "") if mode == "free" else ""
            lines.append(
                f"| schema-valid JSON, {mode} | {labelled} | "
                f"{sides[0].get('schema_valid')} | {sides[1].get('schema_valid')} |"
            )
    ceiling = (data.get("teacher_ceiling") or {}).get("quants") or {}
    quants = (data.get("gguf") or {}).get("quants") or {}
    if quants:
        lines += [
            "",
            "| GGUF | MiB | mean KLD | same top p % | PPL ratio | teacher's KLD / same top p "
            "| goal |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
    for quant, row in quants.items():
        theirs = ceiling.get(quant) or {}
        met = (row.get("goal") or {}).get("met")
        lines.append(
            f"| {quant} | {row.get('mib')} | {row.get('mean_kld')} | {row.get('same_top_p')} | "
            f"{row.get('ppl_ratio')} | {theirs.get('mean_kld')} / {theirs.get('same_top_p')} | "
            f"{'n/a' if met is None else 'met' if met else 'not met'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
