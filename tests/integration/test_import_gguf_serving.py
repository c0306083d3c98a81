"""``distill import-gguf`` on a real ready-made GGUF (the embedded teacher's Q4_1 from PyPI):
the folder it writes holds what the header says, and llama-server serves the imported file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distill import cli, evaluate
from distill.llamacpp import serve
from distill.models import embedded_teacher_gguf

pytestmark = pytest.mark.llamacpp


def test_the_embedded_teachers_gguf_imports_and_serves(
    llama_tools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    source = embedded_teacher_gguf()
    out = tmp_path / "dist" / "smollm2"
    assert cli.main(["import-gguf", "--gguf", str(source), "--output-dir", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == ["SmolLM2-135M-Instruct-Q4_1.gguf"]
    manifest = json.loads((out / "manifest.json").read_text())
    gguf = out / "SmolLM2-135M-Instruct-Q4_1.gguf"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (
        manifest["files"][0]["sha256"] == digest == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    header = manifest["gguf"]
    assert (header["architecture"], header["quant"], header["context_length"]) == (
        "llama",
        "Q4_1",
        8192,
    )
    assert header["tokenizer"]["model"] == "gpt2" and header["tokenizer"]["tokens"] == 49152
    assert header["tokenizer"]["chat_template"]
    with serve(gguf, tools=llama_tools, ctx_size=256, extra=[evaluate.NO_REPACK]) as url:
        reply = httpx.post(
            url + "/completion", json={"prompt": "Bonjour", "n_predict": 4}, timeout=120
        ).json()
    assert reply["tokens_predicted"] > 0
