"""``distill eval``'s GGUF measure with the real ``llama-perplexity``: the tiny model's f16 GGUF
against itself and against its Q8_0, over the sample prompts, short chunks and long."""

from __future__ import annotations

import logging
import subprocess
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


def sample_text(sample_files, tiny_model: Path, at_least: int) -> tuple[str, int]:
    """The first sample prompts making at least ``at_least`` tokens; the text and its tokens."""
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
    return text, n


def test_kld_of_f16_against_itself_and_q8(
    tiny_model: Path, tiny_gguf: Path, tiny_q8: Path, llama_tools, sample_files, tmp_path: Path
) -> None:
    text, n = sample_text(sample_files, tiny_model, 1500)
    ctx = fit_ctx(n, 64)
    assert ctx == 64
    tool = llama_tools.tool("llama-perplexity")
    quants = {"F16": tiny_gguf, "Q8_0": tiny_q8}
    stats = measure(tool, tiny_gguf, quants, text, n, ctx, 2, tmp_path)
    same, q8 = stats["F16"], stats["Q8_0"]
    # The running means after the last whole chunk of the text (a filler chunk follows).
    assert same["chunks"] == q8["chunks"] == (n - 2) // ctx
    assert q8["scored_tokens"] == q8["chunks"] * 31
    # The same file against itself: only the base's 16-bit stored log-probabilities differ.
    assert 0 <= same["mean_kld"] < 1e-4
    assert same["same_top_p"] == 100.0
    assert same["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    # A random tiny model is near-uniform: its Q8_0 KLD is under the printed 1e-5, but the
    # quantization flips some of its many near-ties.
    assert 0 <= q8["mean_kld"] < 0.1
    assert 50 <= q8["same_top_p"] < same["same_top_p"]
    assert q8["ppl"] > 1 and q8["ppl_base"] == pytest.approx(same["ppl_base"], rel=1e-4)
    assert q8["ppl_ratio"] == pytest.approx(q8["ppl"] / q8["ppl_base"], rel=1e-3)
    assert q8["file"] == "tiny-Q8_0.gguf" and q8["mib"] > 0


def test_a_text_of_few_short_chunks_is_measured_too(
    tiny_model: Path, tiny_gguf: Path, tiny_q8: Path, llama_tools, sample_files, tmp_path: Path
) -> None:
    text, n = sample_text(sample_files, tiny_model, 48)
    ctx = fit_ctx(n, 16)
    assert ctx == 16  # 7 tokens scored per chunk, sub-second runs: the tail-loss case
    tool = llama_tools.tool("llama-perplexity")
    q8 = measure(tool, tiny_gguf, {"Q8_0": tiny_q8}, text, n, ctx, 2, tmp_path)["Q8_0"]
    assert q8["source"] == "chunk line" and q8["chunks"] == (n - 2) // ctx
    assert q8["mean_kld"] >= 0 and 0 <= q8["same_top_p"] <= 100
    assert q8["ppl_ratio"] > 0


@pytest.fixture(scope="module")
def slow_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preload library that makes llama.cpp's logger thread slow (``SLOW_LOG_US`` per line):
    what a busy machine does to it, every time."""
    source = Path(__file__).parents[1] / "fixtures" / "llamacpp" / "slow_log.c"
    out = tmp_path_factory.mktemp("slow-log") / "slow_log.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"],
                   check=True)  # fmt: skip
    return out


def test_the_statistics_survive_a_logger_slower_than_the_run(
    tiny_model: Path,
    tiny_gguf: Path,
    tiny_q8: Path,
    llama_tools,
    sample_files,
    slow_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tool = llama_tools.tool("llama-perplexity")
    monkeypatch.setenv("LD_PRELOAD", str(slow_log))
    # The fault is real: a path llama.cpp does not flush (a missing model) loses its last
    # lines under the slow logger.
    monkeypatch.setenv("SLOW_LOG_US", "1000000")
    failed = subprocess.run([str(tool), "-m", str(tmp_path / "missing.gguf")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert failed.returncode == 1
    assert "unable to load model" not in failed.stdout + failed.stderr
    # A KL-divergence run logs about 60 entries, 20 ms each: its chunk lines are still queued
    # when main() returns. The patched end waits for the logger: measured at the first try.
    monkeypatch.setenv("SLOW_LOG_US", "20000")
    text, n = sample_text(sample_files, tiny_model, 48)
    with caplog.at_level(logging.WARNING, logger="distill.evaluate.gguf"):
        q8 = measure(tool, tiny_gguf, {"Q8_0": tiny_q8}, text, n, 16, 2, tmp_path)["Q8_0"]
    assert q8["chunks"] == (n - 2) // 16 and 0 <= q8["same_top_p"] <= 100
    assert "running it again" not in caplog.text
