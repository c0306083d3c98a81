"""Fixtures of the integration tests: GGUF files converted with llama.cpp's own converter.

The pi_agent tests need a tiny decoder GGUF (the session's tiny HF model, converted) and an encoder
GGUF (the embedded MiniLM, converted). Both are cached under the project cache, keyed by what they
are made from, so a second session skips the conversions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _convert(tools, source: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    env = {**os.environ, "PYTHONPATH": str(tools.gguf_py)}
    done = subprocess.run(
        [
            sys.executable,
            str(tools.converter),
            str(source),
            "--outfile",
            str(tmp),
            "--outtype",
            "f16",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"conversion of {source} failed:\n{done.stderr[-2000:]}")
    tmp.replace(out)
    return out


def _cache() -> Path:
    from distill.models import cache_dir

    return cache_dir() / "pi_agent-tests"


@pytest.fixture(scope="session")
def pi_agent_tiny_gguf(request: pytest.FixtureRequest, llama_tools) -> Path:
    """The tiny test model as an f16 GGUF (cached by the hash of its recipe)."""
    import distill.models

    recipe = hashlib.sha256(Path(distill.models.__file__).read_bytes())
    for sample in sorted((Path(__file__).resolve().parents[2] / "dataset").glob("*.jsonl")):
        recipe.update(sample.read_bytes())  # the tiny tokenizer's corpus
    out = _cache() / f"tiny-{recipe.hexdigest()[:16]}.gguf"
    if out.is_file():
        return out
    return _convert(llama_tools, request.getfixturevalue("tiny_model"), out)


@pytest.fixture(scope="session")
def pi_agent_encoder_gguf(llama_tools) -> Path:
    """The embedded MiniLM encoder as an f16 GGUF."""
    from distill.models import embedded_encoder

    source = embedded_encoder()
    digest = hashlib.sha256((source / "config.json").read_bytes()).hexdigest()[:16]
    out = _cache() / f"minilm-{digest}.gguf"
    return out if out.is_file() else _convert(llama_tools, source, out)


@pytest.fixture(scope="session")
def encoder_cosines():
    """``cosines(sentences, vectors)``: the cosine of each vector (one an agent returned for each
    sentence) with the embedded MiniLM's vector on the workstation, made as sentence-transformers
    makes it (transformers, mean pooling over the attention mask)."""
    from distill.models import embedded_encoder

    def cosines(sentences: list[str], vectors: list[list[float]]) -> list[float]:
        import torch
        from transformers import AutoModel, AutoTokenizer

        source = embedded_encoder()
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source).eval()
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        reference = (hidden * mask).sum(1) / mask.sum(1)
        given = torch.tensor(vectors, dtype=reference.dtype)
        return torch.nn.functional.cosine_similarity(given, reference, dim=1).tolist()

    return cosines
