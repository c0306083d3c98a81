"""``distill eval``'s GGUF measure with the real ``llama-perplexity``: the tiny model's f16 GGUF
against itself and against its Q8_0, over the sample prompts, both ways the tool reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.evaluate.gguf import fit_ctx, heldout_text, measure

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_q8(tiny_gguf: Path, llama_tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill.llamacpp import run

    out = tmp_path_factory.mktemp("tiny-q8") / "tiny-Q8_0.gguf"
    run([str(llama_tools.tool("llama-quantize")), str(tiny_gguf), str(out), "Q8_0", "2"])
    return out


def text_file(tmp_path: Path, sample_files, tiny_model: Path, at_least: int) -> tuple[Path, int]:
    """The first sample prompts making at least ``at_least`` tokens; the file and its tokens."""
    from transformers import AutoTokenizer

    from distill.records import read_many

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # The sample rows have no answers yet: their prompts alone make the text.
    records = read_many(list(sample_files))
    for rows in range(1, len(records) + 1):
        text = heldout_text(records[:rows])
        n = len(tokenizer(text)["input_ids"])
        if n >= at_least:
            break
    path = tmp_path / "heldout.txt"
    path.write_text(text, encoding="utf-8")
    return path, n


def test_kld_of_f16_against_itself_and_q8(
    tiny_model: Path, tiny_gguf: Path, tiny_q8: Path, llama_tools, sample_files, tmp_path: Path
) -> None:
    text, n = text_file(tmp_path, sample_files, tiny_model, 1500)
    ctx = fit_ctx(n, 64)
    assert ctx == 64
    tool = llama_tools.tool("llama-perplexity")
    stats = measure(tool, tiny_gguf, {"F16": tiny_gguf, "Q8_0": tiny_q8}, text, ctx, 2)
    same, q8 = stats["F16"], stats["Q8_0"]
    # Over 100 tokens scored: the final statistics, unless llama.cpp lost them (last chunk).
    assert {same["source"], q8["source"]} <= {"statistics", "last chunk"}
    assert same["chunks"] == q8["chunks"] >= 4
    # The same file against itself: only the base's 16-bit stored log-probabilities differ.
    assert 0 <= same["mean_kld"] < 1e-4
    assert same["same_top_p"] == 100.0
    assert same["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert 0 <= q8["mean_kld"] < 0.1 and q8["mean_kld"] > same["mean_kld"]
    assert 0 <= q8["same_top_p"] <= 100
    assert q8["ppl"] > 1 and q8["ppl_base"] == pytest.approx(same["ppl_base"], rel=1e-4)
    assert q8["ppl_ratio"] == pytest.approx(q8["ppl"] / q8["ppl_base"], rel=1e-3)
    assert q8["file"] == "tiny-Q8_0.gguf" and q8["mib"] > 0


def test_few_tokens_report_the_last_chunk(
    tiny_model: Path, tiny_gguf: Path, tiny_q8: Path, llama_tools, sample_files, tmp_path: Path
) -> None:
    text, n = text_file(tmp_path, sample_files, tiny_model, 48)
    ctx = fit_ctx(n, 16)
    assert ctx == 16 and (n // ctx) * (ctx - 1 - ctx // 2) < 100  # 7 tokens scored per chunk
    tool = llama_tools.tool("llama-perplexity")
    q8 = measure(tool, tiny_gguf, {"Q8_0": tiny_q8}, text, ctx, 2)["Q8_0"]
    # llama.cpp tokenizes the text itself: its chunk count may differ by one from HF's count.
    assert q8["source"] == "last chunk" and abs(q8["chunks"] - n // ctx) <= 1
    assert q8["mean_kld"] >= 0 and 0 <= q8["same_top_p"] <= 100
    assert q8["ppl_ratio"] > 0
