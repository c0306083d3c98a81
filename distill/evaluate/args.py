"""The arguments of ``distill eval``, checked when they are parsed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.argspec import arg

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
    teacher: str | None = arg(
        None, help="the teacher: local directory or hub id (default: the embedded teacher)"
    )
    teacher_revision: str | None = arg(None, help="hub revision of --teacher")
    gguf_dir: Path | None = arg(None, help="distill export's output directory (manifest.json)")
    goal_quant: str = arg(
        "Q8_0", help="the quant whose KLD and same top p must match the teacher's own"
    )
    ceiling: bool = arg(
        True, help="quantize the teacher the same way and measure it beside the student"
    )
    max_prompts: int | None = arg(None, help="use only the first N held-out rows")
    max_new_tokens: int = arg(192, help="most tokens the student generates per answer")
    batch_size: int = arg(8, help="rows per batch in the HF forward passes and generation")
    answers: bool = arg(True, help="generate the students' greedy answers (chrF, exact, JSON)")
    json_check: bool = arg(True, help="also generate JSON answers under the schema (xgrammar)")
    ppl_ctx: int = arg(256, help="llama-perplexity chunk size (lowered for little text)")
    threads: int | None = arg(None, help="CPU threads for llama.cpp tools")
    device: str = arg("auto", help="device of the HF models: auto, cpu, cuda")

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.gguf_dir is not None:
            self.gguf_dir = Path(self.gguf_dir)
        if self.data is not None:
            self.data = [Path(p) for p in self.data]
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.ppl_ctx < 16:
            raise ValueError(f"ppl_ctx: at least 16, got {self.ppl_ctx}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts: must be at least 1, got {self.max_prompts}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be at least 1, got {self.threads}")
        self.goal_quant = self.goal_quant.upper()
