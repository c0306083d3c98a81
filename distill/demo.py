"""``make demo``: the main job end to end on the embedded defaults, one stage after another.

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

    @classmethod
    def from_env(cls) -> Settings:
        """Read every knob; a malformed number fails with the variable's name."""
        settings = cls()
        for name in ("demo_run_dir", "demo_teacher", "demo_teacher_url"):
            value = os.environ.get(name.upper())
            if value:
                setattr(settings, name, type(getattr(settings, name))(value))
        for name in ("demo_limit", "demo_batch_size", "demo_max_new_tokens"):
            value = os.environ.get(name.upper())
            if value:
                try:
                    setattr(settings, name, int(value))
                except ValueError:
                    message = f"demo: {name.upper()}={value!r}: expected an integer"
                    raise SystemExit(message) from None
        return settings


def run_stage(stage: str, **values: Any) -> dict[str, Any]:
    """Run one ``distill`` stage as a subprocess; return the JSON summary it prints."""
    command = ops.build(stage, program=str(Path(sys.executable).with_name("distill")), **values)
    log.info("$ %s", command.shell())
    started = time.perf_counter()
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
    return summary


def main() -> int:
    """Label both sample files, write the dataset card, print what was written where."""
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s", stream=sys.stderr)
    settings = Settings.from_env()
    run_dir = settings.demo_run_dir
    labelled_dir = run_dir / "labelled"
    teacher: dict[str, Any] = {}
    if settings.demo_teacher_url:
        teacher["teacher_url"] = settings.demo_teacher_url
    elif settings.demo_teacher:
        teacher["teacher"] = settings.demo_teacher
    results: list[tuple[str, dict[str, Any]]] = []
    labelled = []
    for source in INPUTS:
        output = labelled_dir / Path(source).name
        summary = run_stage(
            "label",
            input=Path(source),
            output=output,
            skip_existing=True,
            batch_size=settings.demo_batch_size,
            max_new_tokens=settings.demo_max_new_tokens,
            limit=settings.demo_limit or None,
            **teacher,
        )
        results.append((f"label {Path(source).name}", summary))
        labelled.append(output)
    card = run_stage("card", input=labelled, output=run_dir / "DATASET_CARD.md")
    results.append(("card", card))

    lines = ["", "pidistill demo: done", ""]
    for name, summary in results:
        if name.startswith("label"):
            lines.append(
                f"  {name}: {summary['labelled']} labelled, {summary['skipped']} skipped, "
                f"{summary['rejected']} rejected, {summary['tokens_per_second']} tok/s "
                f"-> {summary['output']} (rejects: {summary['rejects']})"
            )
        else:
            lines.append(f"  {name}: {summary['rows']} rows -> {summary['card']} (+ .json)")
    print("\n".join(lines))  # noqa: T201 - the demo's closing report
    return 0


if __name__ == "__main__":
    sys.exit(main())
