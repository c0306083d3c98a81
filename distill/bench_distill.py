"""The distillation section of ``make bench``: ``sft``, ``kd`` and ``mix`` side by side.

Each loss trains the same student (the demo's: the embedded teacher with its middle layers
dropped) on the same labelled rows with the teacher's top-K log-probabilities, for the same
number of optimizer steps from the same seed; then ``distill eval`` measures each against the
teacher on the held-out rows. What is compared:

- mean KL(teacher || student) and next-token top-1 agreement, teacher-forced along the
  teacher's held-out answers;
- chrF of the student's greedy answers against the teacher's;
- the share of the student's free JSON answers that are schema-valid.

Goal (issue 11): the better KD variant has at least 20% lower KL and at least 3 points more
agreement than ``sft``.

The labelled data is the demo's (``runs/demo/labelled``) when it is there with its
log-probabilities; otherwise it is labelled here the way the demo does it (``--skip-existing``,
so an interrupted bench resumes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distill.demo import INPUTS, ROOT, Settings, run_stage
from distill.logprobs import sidecar_path

log = logging.getLogger("distill.bench")
LOSSES = ("sft", "kd", "mix")
KL_DROP_GOAL = 0.20  # at least 20% lower held-out KL than sft
AGREEMENT_GAIN_GOAL = 0.03  # at least 3 points more top-1 agreement


def labelled_data(out: Path) -> list[Path]:
    """The demo's labelled files when they carry log-probabilities, else labelled into ``out``."""
    settings = Settings.from_env()
    demo = ROOT / settings.demo_run_dir / "labelled"
    files = [demo / Path(source).name for source in INPUTS]
    if all(f.is_file() and sidecar_path(f).is_file() for f in files):
        log.info("distillation: the demo's labelled rows (%s)", demo)
        return files
    files = []
    for source in INPUTS:
        output = out / "labelled" / Path(source).name
        log.info("distillation: labelling %s with the embedded teacher (logprobs 20)", source)
        run_stage(
            "label",
            input=ROOT / source,
            output=output,
            skip_existing=True,
            batch_size=settings.demo_batch_size,
            max_new_tokens=settings.demo_max_new_tokens,
            logprobs=20,
        )
        files.append(output)
    return files


def train_and_eval(data: list[Path], out: Path, loss: str, steps: int) -> dict[str, Any]:
    """One loss: train ``steps`` steps (the demo's student, seed 0), evaluate, return eval.json."""
    settings = Settings.from_env()
    run_dir = out / loss
    trained = run_stage(
        "train",
        data=data,
        output=run_dir,
        **settings.student(),
        method="lora",
        loss=loss,
        max_steps=steps,
        seed=0,
        overwrite=True,
    )
    run_stage("eval", run_dir=run_dir, max_new_tokens=96, json_check=False)
    evaluation = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    evaluation["train_wall_seconds"] = trained.get("wall_seconds")
    return evaluation


def side(evaluation: dict[str, Any], name: str = "after") -> dict[str, Any]:
    """The four compared measures of one student (``before`` or ``after``) in eval.json."""
    student = (evaluation.get("student_vs_teacher") or {}).get(name) or {}
    free = (student.get("json") or {}).get("free") or {}
    return {
        "mean_kl": student.get("mean_kl"),
        "top1_agreement": student.get("top1_agreement"),
        "chrf": student.get("chrf"),
        "schema_valid": free.get("schema_valid"),
    }


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best KD variant (lowest KL) against sft, and whether the goal is met."""
    sft = results["sft"]
    best = min((loss for loss in results if loss != "sft"), key=lambda k: results[k]["mean_kl"])
    ours = results[best]
    kl_drop = 1 - ours["mean_kl"] / sft["mean_kl"]
    gain = ours["top1_agreement"] - sft["top1_agreement"]
    dropped, gained = kl_drop >= KL_DROP_GOAL, gain >= AGREEMENT_GAIN_GOAL
    return {"best": best, "kl_drop": kl_drop, "agreement_gain": gain,
            "kl_drop_met": dropped, "agreement_gain_met": gained,
            "met": dropped and gained}  # fmt: skip


def measure(out: Path, steps: int) -> dict[str, Any]:
    """Every loss on the same data and steps; the before-training student once; the verdict."""
    out.mkdir(parents=True, exist_ok=True)
    data = labelled_data(out)
    results: dict[str, dict[str, Any]] = {}
    before: dict[str, Any] = {}
    seconds: dict[str, Any] = {}
    for loss in LOSSES:
        log.info("distillation: %s, %d steps", loss, steps)
        evaluation = train_and_eval(data, out, loss, steps)
        results[loss] = side(evaluation)
        before = before or side(evaluation, "before")
        seconds[loss] = evaluation["train_wall_seconds"]
        rows = (evaluation.get("heldout") or {}).get("rows")
        log.info("distillation: %s -> %s (held-out rows %s)", loss, results[loss], rows)
    return {
        "steps": steps,
        "data": [str(p) for p in data],
        "before": before,
        "results": results,
        "train_seconds": seconds,
        "verdict": verdict(results),
    }
