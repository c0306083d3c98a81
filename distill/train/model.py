"""The student model: its base (whole, or one decoder layer in k), loading, adapters."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from distill.train.args import TrainArgs, TrainError
from distill.train.device import torch_dtype

log = logging.getLogger(__name__)


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
