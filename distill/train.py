"""``distill train``: fine-tune a student on the teacher's answers (LoRA, DoRA, QLoRA) and merge.

    distill train --data runs/demo/labelled/quebecois_distill.jsonl --output runs/demo/train
    distill train --data labelled.jsonl --output runs/s --init-from-teacher-every 2 --method dora
    distill train --data labelled.jsonl --output runs/s --method qlora --lora-rank 8 --max-steps 50
    distill train --config train.yaml --output runs/s --resume     # go on from the last checkpoint

Each training sequence is exactly the prompt the teacher saw (``distill.records.render_prompt``,
in the style the labeller recorded in ``metadata.provenance.labeller.prompt_style``) followed by
the teacher's answer and the end-of-sequence token; the loss covers only the answer tokens. Rows
with ``split: heldout`` are kept out of training and used to measure perplexity before and after.

The output directory holds what the run made and how::

    <output>/base/                 the student before training (when layers were dropped)
    <output>/checkpoints/          trainer checkpoints (adapter, optimizer, RNG), for --resume
    <output>/adapter/              the final adapter
    <output>/model/                the merged model, tokenizer with chat template, README.md card
    <output>/training_record.json  config, versions, data hashes, metrics

Devices are picked automatically (CUDA when present: bf16 where supported else fp16, batch size,
activation checkpointing and Liger's fused kernels tuned to a memory budget; fp32 on the CPU);
every choice can be overridden with a flag.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.argspec import arg, describe
from distill.encoding import (
    IGNORE_INDEX,
    DataError,
    Example,
    encode_all,
    ensure_pad_token,
    read_labelled,
)
from distill.records import PROMPT_STYLES, Record

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "qlora")
LAYER_PATTERNS = ("even", "ends")
AUTO_ON_OFF = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_SIDE_FILES = (
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "generation_config.json",
)
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
    lora_dropout: float = arg(0.05, help="dropout on the adapter input")
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


# ----------------------------------------------------------------------------- data


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """First-fit-decreasing bins of whole examples, each bin at most ``max_length`` tokens."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for index, free in enumerate(room):
            if size <= free:
                bins[index].append(example)
                room[index] -= size
                break
        else:
            bins.append([example])
            room.append(max_length - size)
    return bins


class Collator:
    """Batches of examples (padded, with an attention mask) or of packed bins.

    A packed row carries ``position_ids`` that restart at each example and no attention mask:
    transformers then builds a block-diagonal causal mask, so rows never see each other.
    """

    def __init__(self, pad_id: int, packed: bool, multiple_of: int = 1):
        self.pad_id = pad_id
        self.packed = packed
        self.multiple_of = multiple_of

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        import torch

        rows: list[tuple[list[int], list[int], list[int]]] = []
        for item in items:
            group = item if self.packed else [item]
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for example in group:
                ids += example.input_ids
                labels += example.labels
                positions += list(range(len(example.input_ids)))
            rows.append((ids, labels, positions))
        width = max(len(r[0]) for r in rows)
        width = -(-width // self.multiple_of) * self.multiple_of
        batch_ids, batch_labels, batch_pos, batch_mask = [], [], [], []
        for ids, labels, positions in rows:
            pad = width - len(ids)
            batch_ids.append(ids + [self.pad_id] * pad)
            batch_labels.append(labels + [IGNORE_INDEX] * pad)
            batch_pos.append(positions + list(range(pad)))
            batch_mask.append([1] * len(ids) + [0] * pad)
        out = {
            "input_ids": torch.tensor(batch_ids),
            "labels": torch.tensor(batch_labels),
        }
        if self.packed:
            out["position_ids"] = torch.tensor(batch_pos)
        else:
            out["attention_mask"] = torch.tensor(batch_mask)
        return out


# ----------------------------------------------------------------------------- models


@dataclass
class DevicePlan:
    """Where and how the model trains (every field can come from a flag or the auto-tuner)."""

    device: str
    dtype: str
    batch_size: int
    packing: bool
    checkpoint_fraction: float
    fused_kernels: bool
    tuned: bool = False

    def as_dict(self) -> dict[str, Any]:
        """For logs and the run record."""
        return dict(self.__dict__)


def pick_device(requested: str = "auto") -> str:
    """``cuda`` when one is usable and not refused, else ``cpu``."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {requested}: no CUDA device is available")
    return requested


def pick_dtype(requested: str, device: str) -> str:
    """``bfloat16`` on a GPU that has it, else ``float16`` on a GPU, ``float32`` on the CPU."""
    import torch

    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def liger_available() -> bool:
    """Whether Liger's kernels can be imported (they need CUDA and triton)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def keep_layer_indices(total: int, every: int, pattern: str = "even") -> list[int]:
    """One decoder layer in ``every``: evenly spaced, always keeping the first and the last
    (``even``), or the first and the last layers with the middle dropped (``ends``)."""
    count = max(1, math.ceil(total / every))
    if count >= total:
        return list(range(total))
    if pattern == "ends":
        first = math.ceil(count / 2)
        return list(range(first)) + list(range(total - (count - first), total))
    if count == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def drop_layers(model: Any, every: int, pattern: str = "even") -> list[int]:
    """Keep one decoder layer in ``every`` of a causal LM, in place (see keep_layer_indices)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = decoder.layers
    keep = keep_layer_indices(len(layers), every, pattern)
    decoder.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return keep


def prepare_base(args: TrainArgs, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The directory the student starts from: the base itself, or a layer-dropped copy of it."""
    from distill.models import resolve_model

    path, source = resolve_model(args.base_model, revision=args.revision, token=args.hf_token)
    info: dict[str, Any] = {"base": source, "path": str(path)}
    if args.init_from_teacher_every == 1:
        return path, info
    target = run_dir / "base"
    marker = target / "pidistill_init.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if (
            recorded.get("every") == args.init_from_teacher_every
            and recorded.get("pattern", "even") == args.init_layers
        ):
            info.update(recorded)
            info["path"] = str(target)
            return target, info
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    before = model.config.num_hidden_layers
    keep = drop_layers(model, args.init_from_teacher_every, args.init_layers)
    log.info("student init: kept %d of %d decoder layers: %s", len(keep), before, keep)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.save_pretrained(target)
    recorded = {
        "every": args.init_from_teacher_every,
        "pattern": args.init_layers,
        "layers_kept": keep,
        "layers_of": before,
    }
    (target / "pidistill_init.json").write_text(json.dumps(recorded) + "\n")
    del model
    torch.manual_seed(args.seed)
    info.update(recorded)
    info["path"] = str(target)
    return target, info


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name from :data:`DTYPES` (not ``auto``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(base: Path | str, method: str, device: str, dtype: str) -> Any:
    """The base model ready for adapters: full precision, or 4-bit nf4 (double quant) for qlora."""
    from transformers import AutoModelForCausalLM

    compute = torch_dtype(dtype)
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute if device.startswith("cuda") else None,
        )
        model = AutoModelForCausalLM.from_pretrained(
            base,
            quantization_config=quant,
            dtype=compute,
            device_map={"": device},
            attn_implementation="sdpa",
        )
        _no_cpu_repack(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=compute, attn_implementation="sdpa"
        ).to(device)
    model.config.use_cache = False
    return model


def _no_cpu_repack(model: Any) -> None:
    # bitsandbytes 0.50 repacks 4-bit weights for an AVX512-bf16 CPU kernel the first time a
    # module runs in eval mode without grad; that repack fails on widths that are not a multiple
    # of the block size and rewrites the weights in place. Training never needs it.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_adapters(model: Any, args: TrainArgs, checkpointing: bool) -> Any:
    """Wrap the model with peft LoRA (or DoRA) adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets: str | list[str] = (
        "all-linear" if args.target_modules == ["all-linear"] else list(args.target_modules)
    )
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        use_dora=args.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise TrainError(f"target_modules {args.target_modules}: {err}") from None
    return peft_model


def set_checkpointing(model: Any, fraction: float) -> int:
    """Activation checkpointing on the first ``fraction`` of decoder layers; returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if fraction <= 0:
        return 0
    # transformers >= 5.20 renamed gradient checkpointing to activation checkpointing.
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = round(len(layers) * min(fraction, 1.0))
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return count


# Liger's fused linear cross-entropy walks the tokens in chunks sized so the transient logits
# stay near BT x H elements: with a 152k vocabulary that is ~170 chunks a step, whose launch
# overhead measured ~70 ms a step on an H100 (Qwen2-0.5B shape, batch 8). A budget of 32x keeps
# the chunk's logits near 1 GiB at batch 32 and cuts the chunks to a handful (+10-15% tok/s).
LIGER_CHUNK_MEM_CONST = 32


def _widen_liger_chunks() -> None:
    import functools
    import inspect

    import liger_kernel.transformers.functional as liger_functional

    current = liger_functional.liger_fused_linear_cross_entropy
    if isinstance(current, functools.partial):
        return  # already widened
    if "chunk_mem_const" not in inspect.signature(current).parameters:
        return  # an older Liger without the knob
    liger_functional.liger_fused_linear_cross_entropy = functools.partial(
        current, chunk_mem_const=LIGER_CHUNK_MEM_CONST
    )


def apply_fused_kernels(model: Any) -> bool:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on the model."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    _widen_liger_chunks()
    try:
        _apply_liger_kernel_to_instance(model=model)
    except Exception as err:  # an architecture Liger does not know: train without it
        log.warning("Liger kernels not applied: %s", err)
        return False
    return True


# ----------------------------------------------------------------------------- auto-tuning


@dataclass
class Probe:
    """One measured training configuration."""

    batch_size: int
    checkpoint_fraction: float
    tokens_per_second: float
    peak_gib: float
    ok: bool = True


def measure_steps(
    model: Any, batch: dict[str, Any], steps: int, warmup: int = 1, lr: float = 1e-4
) -> tuple[float, float]:
    """Tokens per second and peak device memory (GiB) of forward, backward and AdamW steps.

    The trainable weights are restored afterwards, so probing leaves the model as it was.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=params[0].is_cuda)
    device = params[0].device
    cuda = device.type == "cuda"
    model.train()
    tokens = int(batch["input_ids"].numel())
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        del optimizer
    return tokens * steps / elapsed, peak


def synthetic_batch(vocab: int, batch: int, length: int, device: str) -> dict[str, Any]:
    """Random token ids with labels, for probing and benchmarks."""
    import torch

    ids = torch.randint(0, vocab, (batch, length), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def autotune(
    model: Any,
    length: int,
    budget_gib: float,
    batches: Sequence[int] = (8, 16, 24, 32, 48, 64),
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    steps: int = 3,
) -> tuple[Probe | None, list[Probe]]:
    """The fastest (batch size, checkpointed fraction) whose peak memory fits the budget.

    Each candidate runs a few real training steps on random tokens; a candidate that runs out of
    memory or exceeds the budget stops the search along its batch axis.
    """
    import torch

    device = str(next(model.parameters()).device)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    probes: list[Probe] = []
    for fraction in fractions:
        set_checkpointing(model, fraction) if fraction else _checkpointing_off(model)
        for size in batches:
            batch = synthetic_batch(vocab, size, length, device)
            try:
                rate, peak = measure_steps(model, batch, steps)
            except torch.cuda.OutOfMemoryError:
                probes.append(Probe(size, fraction, 0.0, float("inf"), ok=False))
                break
            finally:
                del batch
                torch.cuda.empty_cache()
            fits = peak <= budget_gib
            probes.append(Probe(size, fraction, rate, peak, ok=fits))
            log.info(
                "autotune: batch %d, checkpointing %.0f%%: %.0f tok/s, %.2f GiB%s",
                size,
                fraction * 100,
                rate,
                peak,
                "" if fits else " (over budget)",
            )
            if not fits:
                break
    _checkpointing_off(model)
    good = [p for p in probes if p.ok]
    return (max(good, key=lambda p: p.tokens_per_second) if good else None), probes


def _checkpointing_off(model: Any) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_gradient_checkpointing", False):
        disable = getattr(base, "activation_checkpointing_disable", None)
        (disable or base.gradient_checkpointing_disable)()


def default_budget_gib(device: str) -> float:
    """8 GiB, or 90% of the free memory of the device when that is less."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return min(8.0, 0.9 * free / 2**30)


def plan_device(args: TrainArgs, longest: int) -> DevicePlan:
    """The device plan before tuning: flags first, then the defaults of the device."""
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    dtype = pick_dtype(args.dtype, device)
    if args.method == "qlora" and dtype == "float16" and not cuda:
        dtype = "float32"
    packing = args.packing == "on" or (args.packing == "auto" and cuda)
    fraction = {"on": 1.0, "off": 0.0}.get(args.gradient_checkpointing, 1.0 if cuda else 0.0)
    fused = (
        cuda
        and (args.fused_kernels == "on" or args.fused_kernels == "auto")
        and (liger_available() or args.fused_kernels == "on")
    )
    if args.fused_kernels == "on" and not cuda:
        log.warning("--fused-kernels on: Liger needs CUDA; training without it on %s", device)
    return DevicePlan(
        device=device,
        dtype=dtype,
        batch_size=args.batch_size or 8,
        packing=packing,
        checkpoint_fraction=fraction,
        fused_kernels=fused,
    )


# ----------------------------------------------------------------------------- running


def versions() -> dict[str, str]:
    """Versions of what trained the model, for the run record and the card."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("pidistill", "torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def data_record(paths: Sequence[Path], records: Sequence[Record]) -> list[dict[str, Any]]:
    """Each data file with its hash and row counts per split."""
    from distill.models import sha256_file

    out = []
    for path in paths:
        rows = [r for r in records if Path(r.source) == path]
        out.append(
            {
                "path": str(path),
                "sha256": sha256_file(path),
                "rows": len(rows),
                "train": sum(r.split == "train" for r in rows),
                "heldout": sum(r.split == "heldout" for r in rows),
            }
        )
    return out


def _check_run_dir(args: TrainArgs) -> None:
    checkpoints = args.output / "checkpoints"
    config_file = checkpoints / "pidistill_config.json"
    if args.resume:
        if config_file.is_file():
            before = json.loads(config_file.read_text())
            now = describe(args)
            changed = [
                k for k in RESUME_KEYS if json.dumps(before.get(k)) != json.dumps(now.get(k))
            ]
            if changed:
                raise TrainError(
                    f"--resume: {config_file} was made with other values of "
                    f"{', '.join(changed)}; resume with the same ones or start a new run"
                )
        return
    if args.output.exists() and any(args.output.iterdir()):
        if not args.overwrite:
            raise TrainError(
                f"{args.output}: run directory is not empty (--resume to go on, "
                "--overwrite to replace it)"
            )
        shutil.rmtree(args.output)


def _last_checkpoint(checkpoints: Path) -> Path | None:
    found = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def run(args: TrainArgs) -> dict[str, Any]:
    """Train, merge and write the run directory; return the summary."""
    from distill.records import atomic_write_json

    started = time.perf_counter()
    log.info("train config: %s", json.dumps(describe(args), ensure_ascii=False))
    records = read_labelled(args.data)  # eagerly, before any model loads
    train_rows = [r for r in records if r.split == "train"]
    heldout_rows = [r for r in records if r.split == "heldout"]
    if not train_rows:
        raise TrainError("no rows with split train in " + ", ".join(map(str, args.data)))
    _check_run_dir(args)
    args.output.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from distill.card_model import write_model_card
    from distill.encoding import answer_perplexity

    transformers.set_seed(args.seed)
    base_path, base_info = prepare_base(args, args.output)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    train_examples, train_stats = encode_all(
        train_rows, tokenizer, args.prompt_style, args.max_length
    )
    heldout_examples, heldout_stats = encode_all(
        heldout_rows, tokenizer, args.prompt_style, args.max_length
    )
    if not train_examples:
        raise TrainError(f"every training prompt is longer than --max-length {args.max_length}")
    log.info(
        "data: %d training sequences (%d tokens, %d truncated), %d held out",
        len(train_examples),
        train_stats["tokens"],
        train_stats["truncated"],
        len(heldout_examples),
    )

    longest = max(len(e.input_ids) for e in train_examples)
    plan = plan_device(args, longest)
    model = load_model(base_path, args.method, plan.device, plan.dtype)
    if plan.fused_kernels:
        plan.fused_kernels = apply_fused_kernels(model)
    model = add_adapters(model, args, plan.checkpoint_fraction > 0)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("adapters: %s, %d trainable of %d parameters", args.method, trainable, total)

    cuda = plan.device.startswith("cuda")
    if cuda and (args.batch_size is None or args.gradient_checkpointing == "auto"):
        budget = args.memory_budget_gib or default_budget_gib(plan.device)
        length = args.max_length if plan.packing else longest
        batches = (args.batch_size,) if args.batch_size else (4, 8, 16, 24, 32, 48)
        fractions = (
            (plan.checkpoint_fraction,)
            if args.gradient_checkpointing != "auto"
            else (0.0, 0.25, 0.5, 0.75, 1.0)
        )
        best, _ = autotune(model, length, budget, batches, fractions)
        if best is not None:
            plan.batch_size = best.batch_size
            plan.checkpoint_fraction = best.checkpoint_fraction
            plan.tuned = True
    checkpointed = set_checkpointing(model, plan.checkpoint_fraction)
    log.info("device plan: %s (%d layers checkpointed)", plan.as_dict(), checkpointed)

    before = answer_perplexity(model, heldout_examples, tokenizer.pad_token_id)
    metrics = _train(model, tokenizer, args, plan, train_examples)
    after = answer_perplexity(model, heldout_examples, tokenizer.pad_token_id)
    log.info("held-out answer perplexity: %.3f before, %.3f after", before or 0, after or 0)

    adapter_dir = args.output / "adapter"
    model.save_pretrained(adapter_dir)
    del model
    if cuda:
        torch.cuda.empty_cache()
    model_dir = args.output / "model"
    merge = merge_adapter(
        base_path, adapter_dir, model_dir, args.method, args.save_dtype, heldout_examples
    )
    save_tokenizer(tokenizer, base_path, model_dir)

    record: dict[str, Any] = {
        "stage": "train",
        "config": describe(args),
        "versions": versions(),
        "base": base_info,
        "data": data_record(args.data, records),
        "train_data": train_stats,
        "heldout_data": heldout_stats,
        "device": plan.as_dict(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "metrics": {
            **metrics,
            "heldout_perplexity_before": before,
            "heldout_perplexity_after": after,
        },
        "merge": merge,
        "outputs": {"model": str(model_dir), "adapter": str(adapter_dir)},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(args.output / "training_record.json", record)
    write_model_card(model_dir, record)
    return {
        "model": str(model_dir),
        "run_dir": str(args.output),
        "method": args.method,
        "steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "tokens_per_second": metrics["tokens_per_second"],
        "heldout_perplexity_before": before,
        "heldout_perplexity_after": after,
        "merge_max_abs_diff": merge["max_abs_logit_diff"],
        "device": plan.device,
        "wall_seconds": record["wall_seconds"],
    }


class _ListDataset:
    """A list as a map-style dataset (the Trainer only needs len and indexing)."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def _train(
    model: Any, tokenizer: Any, args: TrainArgs, plan: DevicePlan, examples: list[Example]
) -> dict[str, Any]:
    """Run the transformers Trainer (checkpoints, resume, accumulation, schedule)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    items: list[Any] = pack(examples, args.max_length) if plan.packing else examples
    cuda = plan.device.startswith("cuda")
    steps_per_epoch = max(1, math.ceil(len(items) / (plan.batch_size * args.grad_accum)))
    total_steps = args.max_steps or math.ceil(steps_per_epoch * args.epochs)
    checkpoints = args.output / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    from distill.records import atomic_write_json

    atomic_write_json(checkpoints / "pidistill_config.json", describe(args))
    save = {"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {}
    training_args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        lr_scheduler_type="cosine",
        warmup_steps=max(0, round(0.03 * total_steps)),
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_strategy=save.get("save_strategy", "epoch"),
        save_steps=save.get("save_steps", 500),
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        bf16=cuda and plan.dtype == "bfloat16",
        fp16=cuda and plan.dtype == "float16",
        use_cpu=not cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
    )
    collator = Collator(tokenizer.pad_token_id, plan.packing, multiple_of=8 if cuda else 1)
    losses: list[dict[str, float]] = []

    class _LogLosses(TrainerCallback):
        def on_log(self, _args: Any, state: Any, _control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                losses.append({"step": state.global_step, "loss": round(float(logs["loss"]), 4)})
                log.info("step %d: loss %.4f", state.global_step, logs["loss"])

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=_ListDataset(items),  # type: ignore[arg-type]
        data_collator=collator,
        callbacks=[_LogLosses()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints to stdout, which carries the summary
    resume_from = _last_checkpoint(checkpoints) if args.resume else None
    if args.resume and resume_from is None:
        log.warning("--resume: no checkpoint under %s; starting from the beginning", checkpoints)
    elif resume_from:
        log.info("resuming from %s", resume_from)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    elapsed = time.perf_counter() - started
    state = trainer.state
    start_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    steps_run = state.global_step - start_step
    tokens_per_step = (
        sum(len(e.input_ids) for e in examples) / max(1, len(items)) * plan.batch_size
    ) * args.grad_accum
    return {
        "steps": state.global_step,
        "resumed_from_step": start_step or None,
        "epochs": round(float(state.epoch or 0), 3),
        "train_loss": round(float(result.training_loss), 4),
        "losses": losses,
        "train_seconds": round(elapsed, 2),
        "tokens_per_second": round(steps_run * tokens_per_step / elapsed, 1) if elapsed else None,
    }


# ----------------------------------------------------------------------------- merging


def merge_adapter(
    base: Path,
    adapter_dir: Path,
    out: Path,
    method: str,
    save_dtype: str,
    probe: Sequence[Example] = (),
) -> dict[str, Any]:
    """Merge the adapter into a full-precision reload of the base and save it.

    The merge runs in float32 on the CPU (for QLoRA too: the 4-bit base is never merged into);
    the result is saved in ``save_dtype`` (auto: float16 for qlora, else the base's own dtype).
    Returns the largest logit difference between adapter and merged model on a probe batch.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if save_dtype == "auto":
        save_dtype = "float16" if method == "qlora" else str(stored or "float32").split(".")[-1]
        if save_dtype not in DTYPES:
            save_dtype = "float32"
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(full, adapter_dir)
    peft_model.eval()
    ids = _probe_ids(probe, config.vocab_size)
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    diff = float((adapter_logits - merged_logits).abs().max())
    if out.exists():
        shutil.rmtree(out)
    merged = merged.to(torch_dtype(save_dtype))
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
    log.info("merged %s adapter into %s (%s); max |logit diff| %.2e", method, out, save_dtype, diff)
    return {"save_dtype": save_dtype, "max_abs_logit_diff": diff, "probe_tokens": int(ids.numel())}


def _probe_ids(examples: Sequence[Example], vocab: int) -> Any:
    import torch

    if examples:
        return torch.tensor([examples[0].input_ids[:64]])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, 32), generator=generator)


def save_tokenizer(tokenizer: Any, base: Path, out: Path) -> None:
    """Save the tokenizer beside the merged model, with a chat template and a pad token."""
    from distill.models import CHATML_TEMPLATE

    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"  # what generation wants
    tokenizer.save_pretrained(out)
    # A fast tokenizer saves tokenizer.json only; llama.cpp's converter reads the sentencepiece
    # model (or the BPE vocab files) of the base, so those travel too, with generation_config.
    for name in TOKENIZER_SIDE_FILES:
        source = base / name
        if source.is_file() and not (out / name).exists():
            shutil.copy2(source, out / name)
