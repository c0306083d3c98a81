"""The arguments of ``distill train``: one dataclass, its checks run at parse time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from distill.argspec import arg
from distill.encoding import DataError
from distill.records import PROMPT_STYLES

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "qlora")
LAYER_PATTERNS = ("even", "ends")
AUTO_ON_OFF = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("sft", "kd", "mix")
# Fields whose change makes a checkpoint meaningless; --resume refuses when they differ.
RESUME_KEYS = (
    "data",
    "base_model",
    "init_from_teacher_every",
    "init_layers",
    "method",
    "lora_rank",
    "lora_alpha",
    "target_modules",
    "max_length",
    "packing",
    "prompt_style",
    "loss",
    "kd_temperature",
    "kd_weight",
    "teacher_model",
    "on_policy",
)


class TrainError(DataError):
    """Training input that cannot be used (the CLI reports it as bad input)."""


@dataclass
class TrainArgs:
    """Arguments of ``distill train``."""

    data: list[Path] = arg(help="labelled JSONL file(s): rows with an assistant answer")
    output: Path = arg(help="run directory (model/, adapter/, checkpoints/, training_record.json)")
    base_model: str | None = arg(
        None,
        help="student base: local dir, hub id or embedded:smollm2-135m-instruct (the default)",
    )
    revision: str | None = arg(None, help="hub revision of --base-model")
    hf_token: str | None = arg(None, help="hub token (or $HF_TOKEN)", secret=True, env="HF_TOKEN")
    init_from_teacher_every: int = arg(
        1, help="keep one decoder layer of the base in k (how they are picked: --init-layers)"
    )
    init_layers: str = arg(
        "even",
        help="which layers a --init-from-teacher-every student keeps: even (evenly spaced, first "
        "and last kept; DistilBERT) or ends (the first half and the last half, the middle dropped)",
        choices=LAYER_PATTERNS,
    )
    method: str = arg("lora", help="adapter method", choices=METHODS)
    lora_rank: int = arg(16, help="adapter rank r")
    lora_alpha: float = arg(32.0, help="adapter scaling alpha")
    lora_dropout: float = arg(
        0.0,
        help="dropout on the adapter input (0: none; on the CPU its random masks took 18%% of a "
        "step)",
    )
    target_modules: list[str] = arg(
        default_factory=lambda: ["all-linear"],
        help="module names to adapt (all-linear: every linear layer but the output head)",
    )
    learning_rate: float = arg(2e-4, help="peak learning rate (cosine decay, 3%% warm-up)")
    epochs: float = arg(3.0, help="passes over the training rows")
    max_steps: int | None = arg(
        None, help="stop after this many optimizer steps (overrides epochs)"
    )
    batch_size: int | None = arg(
        None, help="sequences per device step (default: 8 on the CPU, tuned on CUDA)"
    )
    grad_accum: int = arg(1, help="gradient accumulation steps per optimizer step")
    max_length: int = arg(1024, help="most tokens per sequence (longer answers are cut)")
    group_by_length: bool = arg(
        True,
        help="batches of rows of about the same length, in a drawn order (less padding: random "
        "batches of the demo's rows were 1.5x their tokens); off: random batches",
    )
    packing: str = arg(
        "auto",
        help="pack several rows per sequence (attention kept per row); auto: on with CUDA",
        choices=AUTO_ON_OFF,
    )
    prompt_style: str = arg(
        "auto",
        help="auto: the style each row was labelled with (chat when the tokenizer has a template)",
        choices=("auto", *PROMPT_STYLES),
    )
    loss: str = arg(
        "sft",
        help="sft: cross-entropy on the teacher's answer tokens; kd: KL(teacher || student) on the "
        "teacher's stored top-K log-probabilities (rows labelled with --logprobs); mix: "
        "(1 - w) * sft + w * kd, rows without log-probabilities trained on sft alone",
        choices=LOSSES,
    )
    kd_temperature: float = arg(
        1.0, help="temperature T of kd and mix: both distributions softened by T, loss times T^2"
    )
    kd_weight: float = arg(0.5, help="mix: the weight w of the kd term, in [0, 1]")
    teacher_model: str | None = arg(
        None,
        help="on-policy (--on-policy): the teacher loaded here to score the student's samples "
        "(local dir, hub id or embedded:...; its vocabulary must be the student's)",
    )
    on_policy: float = arg(
        0.0,
        help="kd/mix: the share of batches whose answers the student samples and --teacher-model "
        "scores (GKD); 0: every batch on the labelled answers",
    )
    on_policy_max_new_tokens: int = arg(128, help="on-policy: most tokens a sampled answer has")
    on_policy_temperature: float = arg(1.0, help="on-policy: the student's sampling temperature")
    seed: int = arg(0, help="random seed (data order, adapter init)")
    device: str = arg("auto", help="auto, cpu, cuda or cuda:N")
    dtype: str = arg(
        "auto", help="compute dtype: auto (bf16 or fp16 on CUDA, fp32 on CPU)", choices=DTYPES
    )
    save_dtype: str = arg(
        "auto",
        help="dtype of the merged model: auto (float16 for qlora, else the base's own)",
        choices=DTYPES,
    )
    gradient_checkpointing: str = arg(
        "auto",
        help="activation checkpointing; auto: tuned on CUDA, off on CPU",
        choices=AUTO_ON_OFF,
    )
    fused_kernels: str = arg(
        "auto", help="Liger fused kernels (CUDA only); auto: when installed", choices=AUTO_ON_OFF
    )
    compile: str = arg(
        "auto",
        help="torch.compile each decoder layer; auto: on CUDA (the first step compiles, "
        "about 30 s), off on the CPU",
        choices=AUTO_ON_OFF,
    )
    memory_budget_gib: float | None = arg(
        None, help="GPU memory the auto-tuner may use (default: 8 GiB or 90%% of free)"
    )
    save_steps: int = arg(0, help="checkpoint every N steps (0: at the end of each epoch)")
    save_total_limit: int = arg(2, help="checkpoints kept")
    logging_steps: int = arg(10, help="log the loss every N steps")
    resume: bool = arg(False, help="go on from the last checkpoint in <output>/checkpoints")
    overwrite: bool = arg(False, help="replace an existing run directory")

    def __post_init__(self) -> None:
        self.data = [Path(p) for p in self.data]
        self.output = Path(self.output)
        if not self.data:
            raise ValueError("data: at least one labelled JSONL file is needed")
        positive = ("lora_rank", "grad_accum", "max_length", "init_from_teacher_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("batch_size", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        if self.max_length < 16:
            raise ValueError(f"max_length: at least 16 tokens, got {self.max_length}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.lora_alpha <= 0:
            raise ValueError("learning_rate, epochs and lora_alpha must be positive")
        if self.init_layers not in LAYER_PATTERNS:
            raise ValueError(
                f"init_layers: one of {', '.join(LAYER_PATTERNS)}, got {self.init_layers!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module (or all-linear)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature: must be positive, got {self.kd_temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight: must be in [0, 1], got {self.kd_weight}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy: a share of batches in [0, 1], got {self.on_policy}")
        if self.on_policy > 0 and self.loss == "sft":
            raise ValueError("--on-policy needs --loss kd or mix (the teacher's scores are a KL)")
        if self.on_policy > 0 and not self.teacher_model:
            raise ValueError("--on-policy needs --teacher-model, the teacher to score samples")
        if self.on_policy_max_new_tokens < 1 or not self.on_policy_temperature > 0:
            raise ValueError("on_policy_max_new_tokens and on_policy_temperature must be positive")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite at once: pick one")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ValueError("memory_budget_gib: must be positive")
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device: auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.method == "qlora" and self.dtype == "float32" and self.device.startswith("cuda"):
            log.warning("qlora with float32 compute on CUDA is slow; bfloat16 is usual")
