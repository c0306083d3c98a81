"""``distill eval``'s GGUF step without running llama.cpp: the llama-perplexity output parser,
the goal against the teacher's ceiling, the text and chunk size, the ceiling's cache key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distill.evaluate import EvalError
from distill.evaluate.gguf import ceiling_dir, fit_ctx, heldout_text, meets_goal, parse_kld_output

# The tail of a real `llama-perplexity --kl-divergence` run at the pinned commit (filled below).
FINAL_OUTPUT = None

# Under 100 scored tokens llama-perplexity prints the chunk lines only (format strings of
# tools/perplexity/perplexity.cpp at the pinned commit).
CHUNKS_ONLY = """\
kl_divergence: computing over 3 chunks, n_ctx=32, batch_size=32, n_seq=1
kl_divergence: 0.01 seconds per pass - ETA 0.00 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1     512.3456 ±   40.1234      -0.00123 ±    0.00456       0.00321 ±    0.00012     1.234 ±  0.111 %    93.333 ±  6.667 %
   2     498.0000 ±   30.0000       0.00200 ±    0.00300       0.00410 ±    0.00020     1.500 ±  0.200 %    90.000 ±  5.571 %
   3     500.0000 ±   25.0000       0.01000 ±    0.00500       0.00500 ±    0.00025     1.600 ±  0.150 %    88.889 ±  4.714 %

llama_perf_context_print:        load time =      10.00 ms
"""  # noqa: E501


def test_without_final_statistics_the_last_chunk_stands_in() -> None:
    stats = parse_kld_output(CHUNKS_ONLY)
    assert stats["final"] is False and stats["chunks"] == 3
    assert stats["ppl"] == 500.0 and stats["mean_kld"] == 0.005
    assert stats["mean_kld_unc"] == 0.00025
    assert stats["same_top_p"] == 88.889 and stats["same_top_p_unc"] == 4.714
    assert stats["ppl_ratio"] == pytest.approx(math.exp(0.01), abs=1e-6)
    assert stats["ppl_base"] == pytest.approx(500.0 / math.exp(0.01), abs=1e-4)


def test_non_finite_values_become_none() -> None:
    text = CHUNKS_ONLY.replace("500.0000 ±   25.0000", "inf ±   nan").replace(
        "0.00500 ±    0.00025", "nan ±    nan"
    )
    stats = parse_kld_output(text)
    assert stats["ppl"] is None and stats["mean_kld"] is None and stats["same_top_p"] == 88.889


def test_output_without_statistics_is_an_error() -> None:
    with pytest.raises(ValueError, match="no KL-divergence statistics"):
        parse_kld_output("kl_divergence: failed reading log-probs for chunk 0\n")


TEACHER_Q8 = {"mean_kld": 0.0072, "mean_kld_unc": 0.0003, "same_top_p": 93.2, "same_top_p_unc": 0.4}
GOAL_CASES = {
    "within two combined standard errors: met": ({"mean_kld": 0.0080, "same_top_p": 92.9}, True),
    "a KLD above the teacher's by more: not met": ({"mean_kld": 0.0090, "same_top_p": 93.5}, False),
    "fewer same top tokens by more: not met": ({"mean_kld": 0.0070, "same_top_p": 92.0}, False),
    "better on both: met": ({"mean_kld": 0.0050, "same_top_p": 95.0}, True),
}


@pytest.mark.parametrize(("student", "met"), GOAL_CASES.values(), ids=GOAL_CASES.keys())
def test_the_goal_is_the_teachers_own_quantization(student: dict, met: bool) -> None:
    student = {**student, "mean_kld_unc": 0.0003, "same_top_p_unc": 0.4}
    verdict = meets_goal(student, TEACHER_Q8)
    assert verdict["met"] is met
    # 2 * sqrt(0.0003^2 + 0.0003^2) and 2 * sqrt(0.4^2 + 0.4^2)
    assert verdict["mean_kld_tolerance"] == pytest.approx(0.000849, abs=1e-6)
    assert verdict["same_top_p_tolerance"] == pytest.approx(1.131, abs=1e-3)


def test_a_goal_without_finite_numbers_is_not_met_or_unknown() -> None:
    assert meets_goal({"mean_kld": None, "same_top_p": 90.0}, TEACHER_Q8)["met"] is False
    assert meets_goal(TEACHER_Q8, {"mean_kld": None, "same_top_p": None})["met"] is None


def test_the_chunk_size_halves_until_the_text_holds_two_chunks() -> None:
    assert fit_ctx(6000, 256) == 256
    assert fit_ctx(300, 256) == 128
    assert fit_ctx(100, 256) == 32
    with pytest.raises(EvalError, match="held-out text is 30 tokens"):
        fit_ctx(30, 256)


def test_the_text_is_plain_prompts_and_answers() -> None:
    from distill.records import Record

    rows = [
        Record("a", "Sois bref.", "Salut!", False, None, {}, "heldout", "Allô!"),
        Record("b", "", "Ça va?", False, None, {}, "heldout", "Ben oui."),
    ]
    assert heldout_text(rows) == "Sois bref.\n\nSalut!\n\nAllô!\n\nÇa va?\n\nBen oui.\n"
    assert "<|im_start|>" not in heldout_text(rows)


def test_the_ceiling_cache_is_keyed_by_teacher_and_llama_cpp_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.llamacpp import LLAMA_CPP_COMMIT

    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    hub = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc", "source": "hub"}
    first = ceiling_dir(tmp_path, hub)
    assert first.parent == tmp_path / "cache" / "ceiling"
    assert first.name.startswith("HuggingFaceTB-SmolLM2-135M-Instruct-")
    assert first.name.endswith(f"-llama.cpp-{LLAMA_CPP_COMMIT}")
    assert ceiling_dir(tmp_path, {**hub, "revision": "def"}) != first
    # A local teacher is known by its weights, wherever it lies.
    one, two = tmp_path / "one" / "teacher", tmp_path / "two" / "teacher"
    for where in (one, two):
        where.mkdir(parents=True)
        (where / "config.json").write_text("{}")
        (where / "model.safetensors").write_bytes(b"weights")
    local = {"name": str(one), "revision": None, "source": "local"}
    assert ceiling_dir(one, local) == ceiling_dir(two, {**local, "name": str(two)})
    (two / "model.safetensors").write_bytes(b"other weights")
    assert ceiling_dir(one, local) != ceiling_dir(two, {**local, "name": str(two)})
