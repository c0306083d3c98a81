"""``distill export`` and ``distill eval`` with the pinned llama.cpp: real conversion, quantization,
loading and generation, failures that keep their intermediates, the encoder, the eval table."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from distill import evaluate, export
from distill.export import ExportArgs, ExportError
from distill.llamacpp import serve

pytestmark = pytest.mark.llamacpp

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def labelled(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        needs_json = i % 3 == 0
        rows.append(
            {
                "id": f"r{i:02d}",
                "system_hint": "Réponds en québécois.",
                "user": "Salut! " + "Comment ça va? " * (i % 3 + 1),
                "requires_json": needs_json,
                "json_schema": SCHEMA if needs_json else None,
                "split": "heldout" if i % 4 == 3 else "train",
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "test", "labeller": {"prompt_style": "chat"}},
                },
                "assistant": '{"ok": true}' if needs_json else "Ben correct, pis toi? " * 4,
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_export_writes_ggufs_that_llama_cpp_loads_and_generates_from(
    tiny_model: Path, llama_tools, tmp_path: Path
) -> None:
    import httpx

    out = tmp_path / "dist"
    summary = export.run(
        ExportArgs(model=str(tiny_model), output_dir=out, name="tiny", quant=["Q8_0", "F16"])
    )
    assert summary["files"] == ["tiny-Q8_0.gguf", "tiny-F16.gguf"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "decoder" and manifest["llama_cpp"]["llama_cpp_commit"]
    for entry in manifest["files"]:
        gguf = out / entry["file"]
        assert gguf.read_bytes()[:4] == b"GGUF"
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        assert entry["sha256"] == digest and entry["bytes"] == gguf.stat().st_size
        assert (out / f"{entry['file']}.sha256").read_text() == f"{digest}  {entry['file']}\n"
    assert (out / "tiny-tokenizer" / "tokenizer.model").is_file()
    assert not list(out.glob(".export-*"))  # intermediates removed
    no_repack = [evaluate.NO_REPACK]
    with serve(out / "tiny-Q8_0.gguf", tools=llama_tools, ctx_size=256, extra=no_repack) as url:
        reply = httpx.post(
            url + "/completion", json={"prompt": "Salut", "n_predict": 8}, timeout=60
        ).json()
    assert reply["tokens_predicted"] > 0 and isinstance(reply["content"], str)
    with pytest.raises(ExportError, match="already exported"):
        export.run(ExportArgs(model=str(tiny_model), output_dir=out, name="tiny", quant=["Q8_0"]))


def tensor_types(tools, gguf: Path) -> dict[str, str]:
    """tensor name -> ggml type name, read with the pinned tree's own gguf-py."""
    import sys

    sys.path.insert(0, str(tools.gguf_py))
    try:
        from gguf import GGUFReader

        return {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    finally:
        sys.path.remove(str(tools.gguf_py))


def test_the_token_embeddings_can_stay_unquantized(
    tiny_model: Path, llama_tools, tmp_path: Path
) -> None:
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    export.run(ExportArgs(model=str(tiny_model), output_dir=plain, name="t", quant=["Q8_0"]))
    export.run(
        ExportArgs(
            model=str(tiny_model),
            output_dir=kept,
            name="t",
            quant=["Q8_0"],
            token_embedding_type="F16",
        )
    )
    assert tensor_types(llama_tools, plain / "t-Q8_0.gguf")["token_embd.weight"] == "Q8_0"
    types = tensor_types(llama_tools, kept / "t-Q8_0.gguf")
    assert types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["tensor_types"] == {"token_embedding": "f16", "output": None}


def test_failing_conversion_names_the_command_and_keeps_intermediates(
    tiny_model: Path, llama_tools, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    tmp_parent = tmp_path / "tmp"
    with pytest.raises(ExportError) as caught:
        export.run(
            ExportArgs(
                model=str(broken),
                output_dir=tmp_path / "dist",
                tmp_dir=tmp_parent,
                preserve_tmp_dir=True,
            )
        )
    message = str(caught.value)
    assert "convert_hf_to_gguf.py" in message and "NoSuchModelForCausalLM" in message
    kept = list(tmp_parent.glob(".export-broken-*"))
    assert len(kept) == 1 and f"intermediates kept in {kept[0]}" in message
    assert not list((tmp_path / "dist").glob("*.gguf"))


def test_failing_quantization_keeps_the_converted_file(
    tiny_model: Path, llama_tools, tmp_path: Path, monkeypatch
) -> None:
    from distill import llamacpp

    real_run = llamacpp.run

    def quantize_fails(cmd, **kwargs):
        if "llama-quantize" in cmd[0]:
            cmd = [cmd[0], "/nonexistent.gguf", *cmd[-3:]]
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(llamacpp, "run", quantize_fails)
    with pytest.raises(ExportError, match=r"llama-quantize.*\n(.|\n)*intermediates kept"):
        export.run(
            ExportArgs(
                model=str(tiny_model), output_dir=tmp_path / "d", name="t", preserve_tmp_dir=True
            )
        )
    (kept,) = list((tmp_path / "d").glob(".export-t-*"))
    assert (kept / "converted-f16.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_the_encoder_exports_as_an_embedding_gguf(llama_tools, tmp_path: Path) -> None:
    import httpx

    from distill.models import EMBEDDED_ENCODER

    out = tmp_path / "enc"
    summary = export.run(ExportArgs(model=EMBEDDED_ENCODER, output_dir=out, quant=["Q8_0"]))
    assert summary["kind"] == "encoder" and summary["name"] == "all-minilm-l6-v2"
    assert (out / "all-minilm-l6-v2-tokenizer" / "1_Pooling").is_dir()
    gguf = out / "all-minilm-l6-v2-Q8_0.gguf"
    extra = [evaluate.NO_REPACK, "--embeddings"]
    with serve(gguf, tools=llama_tools, ctx_size=256, extra=extra) as url:
        reply = httpx.post(url + "/v1/embeddings", json={"input": "Salut!"}, timeout=60).json()
    assert len(reply["data"][0]["embedding"]) == 384


@pytest.mark.slow
def test_train_export_eval_end_to_end(tiny_model: Path, llama_tools, tmp_path: Path) -> None:
    from distill import train

    data = labelled(tmp_path / "labelled.jsonl")
    run_dir = tmp_path / "run"
    train.run(
        train.TrainArgs(
            data=[data], output=run_dir, base_model=str(tiny_model), max_steps=4, batch_size=4,
            lora_rank=4, learning_rate=1e-2, max_length=256,
        )
    )  # fmt: skip
    dist = tmp_path / "dist"
    export.run(ExportArgs(model=str(run_dir / "model"), output_dir=dist, quant=["Q8_0", "Q4_K_M"]))
    summary = evaluate.run(
        evaluate.EvalArgs(
            run_dir=run_dir, gguf_dir=dist, teacher=str(tiny_model), max_new_tokens=16, ppl_ctx=32
        )
    )
    assert summary["perplexity_dropped"] is True
    before, after = summary["before"], summary["after"]
    # The student starts as the teacher itself (the tiny model is both): identical at first.
    assert before["top1_agreement"] == 1.0 and before["mean_kl"] == 0.0
    assert before["answer_perplexity"] == summary["teacher_answer_perplexity"]
    assert 0.0 <= after["top1_agreement"] <= 1.0 and after["mean_kl"] > 0
    assert 0.0 <= after["chrf"] <= 100.0 and 0.0 <= after["exact_match"] <= 1.0
    assert after["schema_valid_constrained"] == 1.0
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["teacher"]["json"]["schema_valid"] == 1.0
    assert set(evaluation["student_vs_teacher"]) == {"before", "after"}
    assert set(summary["gguf"]) == set(summary["teacher_ceiling"]) == {"Q8_0", "Q4_K_M"}
    for side in ("gguf", "teacher_ceiling"):
        for stats in summary[side].values():
            assert stats["mean_kld"] is None or stats["mean_kld"] >= 0
            assert stats["same_top_p"] is None or 0 <= stats["same_top_p"] <= 100
    assert evaluation["gguf"]["base"]["type"] == "F16" and evaluation["gguf"]["ctx"] <= 32
    assert evaluation["goal"]["quant"] == "Q8_0"
    assert summary["goal_met"] in (True, False)
    assert evaluation["gguf"]["quants"]["Q8_0"]["goal"]["met"] is summary["goal_met"]
    card = (run_dir / "model" / "README.md").read_text()
    assert "| next-token top-1 agreement with the teacher |" in card
    assert "| t-Q8_0.gguf |" not in card and "-Q8_0.gguf |" in card
