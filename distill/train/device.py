"""Where and how the student trains: the device plan, autotuning, fused kernels, checkpointing.

Devices are picked automatically (CUDA when present: bf16 where supported else fp16, batch size,
activation checkpointing and Liger's fused kernels tuned to a memory budget; fp32 on the CPU);
every choice can be overridden with a flag.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distill.train.args import TrainArgs, TrainError
from distill.train.ranks import ranks

log = logging.getLogger(__name__)


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
    processes: int = 1  # data-parallel processes (torchrun, accelerate launch)
    compiled: bool = False  # each decoder layer under torch.compile

    def as_dict(self) -> dict[str, Any]:
        """For logs and the run record."""
        return dict(self.__dict__)


def pick_device(requested: str = "auto") -> str:
    """``cuda`` when one is usable and not refused, else ``cpu``.

    Under a launcher (torchrun, accelerate launch), ``cuda`` is the GPU of the local rank.
    """
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {requested}: no CUDA device is available")
    here = ranks()
    if requested == "cuda" and here.distributed:
        return f"cuda:{here.local_rank}"
    return requested


def pick_dtype(requested: str, device: str) -> str:
    """``bfloat16`` on a GPU that has it, else ``float16`` on a GPU, ``float32`` on the CPU."""
    import torch

    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name from :data:`DTYPES` (not ``auto``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def liger_available() -> bool:
    """Whether Liger's kernels can be imported (they need CUDA and triton)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


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


def compile_layers(model: Any) -> int:
    """Each decoder layer under ``torch.compile`` (in place: the weights keep their names, so
    adapters save and merge as before); returns how many.

    Inductor fuses what a LoRA layer leaves to many small kernels (the adapters' products and
    sums, norms, rotary embeddings). One graph serves every layer of the same shape, so the
    first step pays the compile once (about 30 s on an H200 for Qwen2-0.5B) and a new sequence
    length at most once more (then its dimensions are dynamic). Measured on an H200 (``make
    bench``, Qwen2-0.5B shape, batch 64 x 512, LoRA r16): 71.9k tokens/s against 52.4k with
    Liger's kernels alone, at less memory; kd 52.0k against 39.6k.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    # Dynamo reads Liger's triton kernels to see what they write, fails on their float
    # arguments, warns with a traceback (thousands of lines a run) and assumes every input is
    # written, which is right and costs nothing here: keep its warnings out of the log.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


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


@dataclass
class Probe:
    """One measured training configuration."""

    batch_size: int
    checkpoint_fraction: float
    tokens_per_second: float
    peak_gib: float
    ok: bool = True


def measure_steps(
    model: Any,
    batch: dict[str, Any],
    steps: int,
    warmup: int = 1,
    lr: float = 1e-4,
    objective: Any = None,
    split: Any = None,
) -> tuple[float, float]:
    """Tokens per second and peak device memory (GiB) of forward, backward and AdamW steps.

    ``objective`` (a :class:`distill.train.losses.Objective`) computes the loss, through
    ``split`` (:class:`distill.encoding.SplitHead`) when given; by default the model's own
    cross-entropy.

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
            loss = objective(model, batch, split)[0] if objective else model(**batch).loss
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


def synthetic_batch(
    vocab: int,
    batch: int,
    length: int,
    device: str,
    teacher_k: int = 0,
    answer_share: float = 1.0,
) -> dict[str, Any]:
    """Random token ids with labels (and K teacher candidates a position), for probes, benches.

    ``answer_share`` < 1: each row's first positions are a prompt, without labels or targets.
    """
    import torch

    ids = torch.randint(0, vocab, (batch, length), device=device)
    prompt = length - max(1, round(length * answer_share))
    out = {"input_ids": ids, "labels": ids.clone()}
    out["labels"][:, :prompt] = -100
    if teacher_k:
        out["teacher_ids"] = torch.randint(0, vocab, (batch, length, teacher_k), device=device)
        out["teacher_ids"][:, :prompt] = -1
        spread = torch.randn(batch, length, teacher_k + 1, device=device)
        out["teacher_logprobs"] = torch.log_softmax(spread, -1)[..., :teacher_k]
    return out


def autotune(
    model: Any,
    length: int,
    budget_gib: float,
    batches: Sequence[int] = (8, 16, 24, 32, 48, 64),
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    steps: int = 3,
    objective: Any = None,
    teacher_k: int = 0,
    split: Any = None,
) -> tuple[Probe | None, list[Probe]]:
    """The fastest (batch size, checkpointed fraction) whose peak memory fits the budget.

    Each candidate runs a few real training steps on random tokens (with ``teacher_k`` random
    teacher candidates a position when the ``objective`` is kd or mix, whose logits copies cost
    memory too); a candidate that runs out of memory or exceeds the budget stops the search
    along its batch axis.
    """
    import torch

    device = str(next(model.parameters()).device)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    probes: list[Probe] = []
    for fraction in fractions:
        set_checkpointing(model, fraction) if fraction else _checkpointing_off(model)
        for size in batches:
            batch = synthetic_batch(vocab, size, length, device, teacher_k)
            try:
                rate, peak = measure_steps(model, batch, steps, objective=objective, split=split)
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
    # auto leaves it off for --on-policy: the student's sampling would recompile at each length.
    compiled = args.compile == "on" or (
        args.compile == "auto" and cuda and not args.on_policy and _inductor_ready()
    )
    return DevicePlan(
        device=device,
        dtype=dtype,
        batch_size=args.batch_size or 8,
        packing=packing,
        checkpoint_fraction=fraction,
        fused_kernels=fused,
        processes=ranks().world_size,
        compiled=compiled,
    )


def _inductor_ready() -> bool:
    """Whether torch.compile can build GPU kernels here (Inductor needs triton for CUDA)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
