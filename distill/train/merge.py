"""Merging: the adapter into a full-precision base, checked, saved with its tokenizer."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.encoding import Example
from distill.train.args import DTYPES
from distill.train.device import torch_dtype

log = logging.getLogger(__name__)

TOKENIZER_SIDE_FILES = (
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "generation_config.json",
)


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
