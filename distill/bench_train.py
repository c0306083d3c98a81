"""Training throughput and memory per adapter method, for ``make bench``.

    python -c "from distill.bench_train import bench_training; print(bench_training())"
    make bench        # distill.bench calls bench_training() and tabulates its rows

On the CPU: a small LlamaForCausalLM (random weights), LoRA, DoRA and QLoRA, tokens per second
of whole training steps (forward, backward, AdamW) and the process's peak resident memory.

On a CUDA device, when there is one: a Qwen2-0.5B-shaped model (random weights, 151,936-token
vocabulary) at 512 tokens per sequence, LoRA r=16 on every linear layer, bf16. Two rows: the
seed's default (batch 8, activation checkpointing on every layer, no fused kernels) and the
configuration ``distill train`` picks by itself (Liger's fused kernels when installed, batch
size and share of checkpointed layers tuned to an 8 GiB budget), with peak allocated memory.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CUDA_SEQ_LEN = 512
CUDA_BUDGET_GIB = 8.0


def _rss_bytes() -> int:
    with Path("/proc/self/statm").open() as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples the process's resident memory in a thread; ``peak`` in GiB."""

    def __init__(self, every: float = 0.01):
        self.every = every
        self.peak_bytes = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            time.sleep(self.every)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return self.peak_bytes / 2**30


def _cpu_model(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _args(method: str, **extra: Any) -> Any:
    from distill.train import TrainArgs

    return TrainArgs(
        data=[Path("bench")],
        output=Path("bench"),
        method=method,
        lora_rank=16,
        lora_dropout=0.0,
        **extra,
    )


def bench_cpu(steps: int = 4, batch: int = 4, length: int = 256) -> list[dict[str, Any]]:
    """One row per method on the CPU with a small random Llama."""
    import tempfile

    import torch

    from distill.train.device import measure_steps, synthetic_batch
    from distill.train.model import add_adapters, load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _cpu_model(Path(tmp) / "model")
        for method in ("lora", "dora", "qlora"):
            torch.manual_seed(0)
            with _PeakRss() as rss:
                model = add_adapters(
                    load_model(base, method, "cpu", "float32"), _args(method), False
                )
                data = synthetic_batch(model.config.vocab_size, batch, length, "cpu")
                rate, _ = measure_steps(model, data, steps, warmup=2)
            rows.append(
                {
                    "bench": "train",
                    "device": "cpu",
                    "model": "llama 4x256 (random)",
                    "method": method,
                    "seq_len": length,
                    "batch": batch,
                    "config": "fp32",
                    "tokens_per_s": round(rate, 1),
                    "peak_mem_gib": round(rss.peak, 3),
                    "memory": "process peak RSS",
                }
            )
            log.info("bench train cpu %s: %.0f tok/s", method, rate)
            del model
    return rows


def _qwen2_05b_shaped() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_cache=False,
    )


def _cuda_model(fused: bool, config: Any = None, device: str = "cuda") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.train.device import apply_fused_kernels
    from distill.train.model import add_adapters

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config or _qwen2_05b_shaped(), dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(device)
    applied = apply_fused_kernels(model) if fused else False
    return add_adapters(model, _args("lora"), True), applied


def bench_cuda(
    steps: int = 10,
    teacher_k: int = 20,
    device: str = "cuda",
    config: Any = None,
    seq_len: int = CUDA_SEQ_LEN,
) -> list[dict[str, Any]]:
    """The seed default and the auto-tuned configuration on a CUDA device, then ``sft``, ``kd``
    and ``mix`` as ``distill train`` runs them: half of each row an answer, logits at the
    answer's positions only (in chunks), ``teacher_k`` teacher candidates a position, each
    objective autotuned to the same budget. Each configuration is measured twice: eager layers,
    and layers under ``torch.compile`` (what ``distill train --compile auto`` picks on CUDA).
    ``device``, ``config`` (a transformers config) and ``seq_len`` other than the defaults: a
    small rehearsal of the same code on the CPU."""
    import torch

    from distill.encoding import split_head
    from distill.train.device import (
        autotune,
        compile_layers,
        liger_available,
        measure_steps,
        set_checkpointing,
        synthetic_batch,
    )
    from distill.train.losses import Objective

    rows = []
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    model_name = f"{config.model_type} (random)" if config else "qwen2-0.5b-shaped (random)"
    common = {"bench": "train", "device": name, "model": model_name,
              "method": "lora r16 all-linear", "seq_len": seq_len,
              "memory": "torch peak allocated"}  # fmt: skip

    def add(row: dict[str, Any]) -> None:
        rows.append({**common, **row})
        log.info("bench train cuda: %s", rows[-1])

    model, _ = _cuda_model(False, config, device)
    set_checkpointing(model, 1.0)
    data = synthetic_batch(model.config.vocab_size, 8, seq_len, device)
    rate, peak = measure_steps(model, data, steps, warmup=2)
    add({"batch": 8, "config": "seed default: checkpointing, no fused kernels",
         "tokens_per_s": round(rate), "peak_mem_gib": round(peak, 2)})  # fmt: skip
    del model, data
    torch.cuda.empty_cache()

    model, fused = _cuda_model(liger_available() and device == "cuda", config, device)
    kernels = f"fused kernels {'on' if fused else 'off (liger not installed)'}"
    vocab = model.config.vocab_size
    # distill train's order: autotune the plain model, then compile its layers and train.
    compiled, _ = _cuda_model(fused, config, device)
    compile_layers(compiled)

    def measure(best: Any, objective: Any = None, k: int = 0, share: float = 1.0) -> None:
        plain = objective.loss if objective else "auto"
        for variant, each in ((plain, model), (f"{plain} + compile", compiled)):
            set_checkpointing(each, best.checkpoint_fraction)
            data = synthetic_batch(vocab, best.batch_size, seq_len, device, k, share)
            started = time.perf_counter()
            rate, peak = measure_steps(
                each, data, steps, warmup=2, objective=objective, split=splits[each]
            )
            layers = "compiled" if each is compiled else "eager"
            what = (
                f"--loss {objective.loss}: half of each row an answer, logits there only "
                f"(chunked){f', top-{k} teacher targets' if k else ''}"
                if objective
                else "auto"
            )
            add({"loss": objective.loss if objective else "sft", "variant": variant,
                 "batch": best.batch_size,
                 "config": f"{what}: {kernels}, layers {layers}, "
                           f"{best.checkpoint_fraction:.0%} of layers checkpointed, "
                           f"budget {CUDA_BUDGET_GIB} GiB",
                 "tokens_per_s": round(rate), "peak_mem_gib": round(peak, 2),
                 "seconds_with_warmup": round(time.perf_counter() - started, 1)})  # fmt: skip
            del data
            torch.cuda.empty_cache()

    splits: dict[Any, Any] = {model: None, compiled: None}
    best, _ = autotune(model, seq_len, CUDA_BUDGET_GIB)
    if best is not None:
        measure(best)

    splits = {model: split_head(model), compiled: split_head(compiled)}
    for loss in ("sft", "kd", "mix"):
        objective = Objective(loss)
        k = teacher_k if objective.uses_teacher else 0
        # A shorter search than distill train's (the device's time is short): every pick so far
        # was fully checkpointed, at batch 48 or 64.
        best, _ = autotune(model, seq_len, CUDA_BUDGET_GIB, batches=(16, 32, 48, 64),
                           fractions=(0.5, 1.0), objective=objective, teacher_k=k,
                           split=splits[model])  # fmt: skip
        if best is None:
            add({"loss": loss, "batch": 0, "config": "nothing fits the budget",
                 "tokens_per_s": 0, "peak_mem_gib": 0.0})  # fmt: skip
            continue
        measure(best, objective, k, 0.5)
    return rows


def bench_training() -> list[dict[str, Any]]:
    """Rows for ``make bench``: the CPU methods, then CUDA when a device is present."""
    import torch

    rows = bench_cpu()
    if torch.cuda.is_available():
        rows += bench_cuda()
    return rows
