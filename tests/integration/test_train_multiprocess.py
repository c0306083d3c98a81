"""``distill train`` under torchrun and accelerate launch: two processes on the CPU (gloo).

Each process runs ``distill.cli`` behind an audit hook that lists every file it creates, writes,
renames or removes under the run directory, so the test sees which rank wrote what: rank 0
writes the run directory, rank 1 only its own RNG state in the Trainer's checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TRAIN_ROWS = 36
HELDOUT_ROWS = 12
BATCH = 4
STEPS = 8
PROCESSES = 2

# Run inside each process: record the paths it writes under PIDISTILL_TEST_RUN_DIR, then run
# distill.cli as ``python -m distill.cli`` would.
AUDITED = """\
import atexit, os, runpy, sys

run_dir = os.path.realpath(os.environ["PIDISTILL_TEST_RUN_DIR"])
log = os.environ["PIDISTILL_TEST_WRITES"].format(rank=os.environ["RANK"])
written = []
CHANGES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not (mode and any(c in mode for c in "wax+")) and not (flags or 0) & WRITE_FLAGS:
            return
    elif event not in CHANGES:
        return
    else:
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path == run_dir or path.startswith(run_dir + os.sep):
            written.append(f"{event} {os.path.relpath(path, run_dir)}")


def save():
    with open(log, "w") as handle:
        handle.write("".join(line + "\\n" for line in written))


atexit.register(save)
sys.addaudithook(hook)
sys.argv[0] = "distill"
runpy.run_module("distill.cli", run_name="__main__")
"""


@dataclass(frozen=True)
class Launcher:
    name: str
    command: str  # {port}: a free port for the rendezvous


LAUNCHERS = [
    Launcher(
        "torchrun",
        f"torchrun --nproc-per-node {PROCESSES} --master-addr 127.0.0.1 --master-port {{port}}",
    ),
    # --multi-gpu asks for several processes; with --device cpu they train on gloo.
    Launcher(
        "accelerate launch",
        f"accelerate launch --multi-gpu --num-processes {PROCESSES} --num-machines 1 "
        "--mixed-precision no --dynamo-backend no --main-process-port {port}",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def labelled(path: Path) -> Path:
    """Rows of the same answer to varied greetings: a loss that falls within a few steps."""
    rows = []
    for i in range(TRAIN_ROWS + HELDOUT_ROWS):
        rows.append(
            {
                "id": f"r{i:02d}",
                "system_hint": "Réponds en québécois.",
                "user": "Salut! " + "Comment ça va? " * (i % 3 + 1) + f"({i})",
                "requires_json": False,
                "json_schema": None,
                "assistant": "Ben correct, pis toi?",
                "split": "heldout" if i >= TRAIN_ROWS else "train",
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "test", "labeller": {"prompt_style": "chat"}},
                },
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda launcher: launcher.name)
def test_two_processes_train_and_only_rank_0_writes(
    launcher: Launcher, tiny_model: Path, tmp_path: Path
) -> None:
    data = labelled(tmp_path / "labelled.jsonl")
    run_dir = tmp_path / "run"
    script = tmp_path / "audited_distill.py"
    script.write_text(AUDITED)
    program, *options = launcher.command.format(port=free_port()).split()
    command = [
        str(Path(sys.executable).parent / program),  # the venv's torchrun or accelerate
        *options,
        str(script),
        "train",
        "--data", str(data),
        "--output", str(run_dir),
        "--base-model", str(tiny_model),
        "--device", "cpu",
        "--max-steps", str(STEPS),
        "--batch-size", str(BATCH),
        "--lora-rank", "4",
        "--learning-rate", "5e-3",
        "--logging-steps", "1",
        "--max-length", "256",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PIDISTILL_TEST_RUN_DIR": str(run_dir),
        "PIDISTILL_TEST_WRITES": str(tmp_path / "writes-{rank}.txt"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    # The summary once, from a run of two processes.
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    summary = json.loads(lines[0])
    assert summary["processes"] == PROCESSES
    assert summary["steps"] == STEPS
    # Progress from rank 0 only: each step's line once.
    steps = re.findall(r"step (\d+): loss", done.stderr)
    assert steps == [str(s) for s in range(1, STEPS + 1)], done.stderr[-4000:]

    record = json.loads((run_dir / "training_record.json").read_text())
    losses = [entry["loss"] for entry in record["metrics"]["losses"]]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["heldout_perplexity_after"] < summary["heldout_perplexity_before"]
    # Sharded: each step took a batch from each process, so an epoch is half the steps.
    steps_per_epoch = math.ceil(TRAIN_ROWS / (BATCH * PROCESSES))
    assert record["metrics"]["epochs"] == pytest.approx(STEPS / steps_per_epoch, abs=1e-3)

    # Only rank 0 wrote, apart from rank 1's RNG state in the checkpoints.
    rank0 = (tmp_path / "writes-0.txt").read_text().splitlines()
    rank1 = (tmp_path / "writes-1.txt").read_text().splitlines()
    assert any(line.endswith("model/config.json") for line in rank0), rank0
    # The hook sees rank 1 too (the Trainer makes each checkpoint's folder on every rank).
    assert any("checkpoints/checkpoint-" in line for line in rank1), rank1
    rng = re.compile(r"checkpoints/checkpoint-\d+(/rng_state_1\.pth)?$")
    assert [w for w in rank1 if not rng.search(w.split(" ", 1)[1])] == [], rank1
    # Nothing half-written or per-rank left beside the outputs, one merged model.
    names = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert [n for n in names if n.endswith(".tmp") or "/." in "/" + n] == [], names
    model_dir = run_dir / "model"
    assert [p.name for p in model_dir.glob("*.safetensors")] == ["model.safetensors"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "adapter",
        "checkpoints",
        "model",
        "training_record.json",
    ]

    # The merged model loads and generates.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer("Salut! Comment ça va?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
