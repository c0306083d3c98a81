"""``distill eval``'s GGUF step without running llama.cpp: the llama-perplexity output parser,
the goal against the teacher's ceiling, the text and chunk size, the ceiling's cache key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distill.evaluate import EvalError
from distill.evaluate.gguf import (
    ceiling_dir,
    fit_ctx,
    heldout_text,
    kl_divergence,
    meets_goal,
    parse_kld_output,
)

# A real `llama-perplexity --kl-divergence` run at the pinned commit: the embedded teacher's Q8_0
# against its F16 over 25 held-out rows (stderr's two lines first, chunks 1-17 left out).
TEACHER_Q8_0 = """\
0.02.234.019 I kl_divergence: computing over 20 chunks, n_ctx=256, batch_size=256, n_seq=1
0.12.154.291 I kl_divergence: 9.92 seconds per pass - ETA 3.30 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
  18      12.8082 ±    0.8554       0.01205 ±    0.00330       0.00589 ±    0.00024     1.911 ±  0.095 %    95.801 ±  0.420 %
  19      11.3940 ±    0.7339       0.01174 ±    0.00313       0.00566 ±    0.00022     1.892 ±  0.091 %    95.980 ±  0.400 %
  20      10.8078 ±    0.6741       0.01074 ±    0.00300       0.00565 ±    0.00022     1.922 ±  0.088 %    96.024 ±  0.388 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  10.807760 ±   0.674101
Mean PPL(base)                :  10.692321 ±   0.662527
Cor(ln(PPL(Q)), ln(PPL(base))):  99.89%
Mean ln(PPL(Q)/PPL(base))     :   0.010739 ±   0.002997
Mean PPL(Q)/PPL(base)         :   1.010796 ±   0.003029
Mean PPL(Q)-PPL(base)         :   0.115440 ±   0.033947

====== KL divergence statistics ======
Mean    KLD:   0.005648 ±   0.000219
Maximum KLD:   0.366234
99.9%   KLD:   0.091631
99.0%   KLD:   0.040410
95.0%   KLD:   0.019068
90.0%   KLD:   0.012339
Median  KLD:   0.003342
10.0%   KLD:   0.000096
 5.0%   KLD:   0.000025
 1.0%   KLD:   0.000004
 0.1%   KLD:  -0.000000
Minimum KLD:  -0.000003

====== Token probability statistics ======
Mean    Δp: -0.101 ± 0.038 %
Maximum Δp: 12.450%
99.9%   Δp: 11.415%
99.0%   Δp:  6.365%
95.0%   Δp:  2.573%
90.0%   Δp:  1.259%
75.0%   Δp:  0.171%
Median  Δp: -0.001%
25.0%   Δp: -0.363%
10.0%   Δp: -1.706%
 5.0%   Δp: -2.827%
 1.0%   Δp: -6.306%
 0.1%   Δp: -12.297%
Minimum Δp: -24.014%
RMS Δp    :  1.922 ± 0.088 %
Same top p: 96.024 ± 0.388 %

"""  # noqa: E501

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


def test_the_final_statistics_of_a_real_run() -> None:
    stats = parse_kld_output(TEACHER_Q8_0)
    assert stats == {
        "source": "statistics",
        "ppl": 10.80776,
        "ppl_unc": 0.674101,
        "ppl_base": 10.692321,
        "ppl_base_unc": 0.662527,
        "ppl_ratio": 1.010796,
        "ppl_ratio_unc": 0.003029,
        "mean_kld": 0.005648,
        "mean_kld_unc": 0.000219,
        "same_top_p": 96.024,
        "same_top_p_unc": 0.388,
        "kld_max": 0.366234,
        "kld_99": 0.04041,
        "kld_median": 0.003342,
        "chunks": 20,
    }


def test_a_real_run_whose_statistics_were_lost_reads_its_last_chunk() -> None:
    cut = TEACHER_Q8_0[: TEACHER_Q8_0.index("====== Perplexity")]
    stats = parse_kld_output(cut)
    assert stats["source"] == "chunk line" and stats["chunks"] == 20
    # The running values after the last chunk are the final means, to the printed digits.
    assert stats["mean_kld"] == 0.00565 and stats["mean_kld_unc"] == 0.00022
    assert stats["same_top_p"] == 96.024 and stats["same_top_p_unc"] == 0.388
    assert stats["ppl_ratio"] == pytest.approx(1.010796, abs=1e-5)
    assert stats["ppl_base"] == pytest.approx(10.692321, abs=1e-3)
    assert stats["ppl"] == 10.8078 and "kld_max" not in stats
    with pytest.raises(ValueError, match="stops at chunk 19 of 20"):
        parse_kld_output(cut[: cut.index("  20      10.8078")])


def test_a_chosen_chunk_is_read_even_with_the_final_statistics() -> None:
    # eval measures N chunks then one of filler: the statistics cover the filler too.
    stats = parse_kld_output(TEACHER_Q8_0, chunk=19)
    assert stats["source"] == "chunk line" and stats["chunks"] == 19
    assert stats["mean_kld"] == 0.00566 and stats["same_top_p"] == 95.98
    assert stats["ppl"] == 11.394
    with pytest.raises(ValueError, match="stops at chunk 20 of 21"):
        parse_kld_output(TEACHER_Q8_0, chunk=21)


def test_without_final_statistics_the_last_chunk_stands_in() -> None:
    stats = parse_kld_output(CHUNKS_ONLY)
    assert stats["source"] == "chunk line" and stats["chunks"] == 3
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


def test_an_output_that_lost_its_last_chunk_is_refused() -> None:
    # llama.cpp's asynchronous logger can drop the tail of the output at exit: the running
    # values of chunk 2 of 3 are not the means over the whole text.
    cut = CHUNKS_ONLY[: CHUNKS_ONLY.index("   3     500")]
    with pytest.raises(ValueError, match="stops at chunk 2 of 3"):
        parse_kld_output(cut)


# What a busy CI worker once got from a real run that exited 0: stderr up to the thread pool's
# start, then nothing (the logger lost the rest).
LOST_AFTER_LOADING = """\
0.00.004.510 W load: control-looking token:      5 '<|im_end|>' was not control-type
0.00.005.948 I cmn          init: llama threadpool init, n_threads = 2
"""


def _flaky_tool(tmp_path: Path, lost_runs: int) -> Path:
    """A stand-in llama-perplexity whose first ``lost_runs`` runs lose their output (the fault
    cannot be caused on demand with the real binary), then print CHUNKS_ONLY."""
    (tmp_path / "lost.txt").write_text(LOST_AFTER_LOADING, encoding="utf-8")
    (tmp_path / "whole.txt").write_text(CHUNKS_ONLY, encoding="utf-8")
    tool = tmp_path / "llama-perplexity"
    tool.write_text(
        "#!/bin/sh\n"
        f'd="{tmp_path}"\n'
        'n=$(cat "$d/runs" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$d/runs"\n'
        f'if [ "$n" -le {lost_runs} ]; then cat "$d/lost.txt" >&2; else cat "$d/whole.txt"; fi\n',
        encoding="utf-8",
    )
    tool.chmod(0o755)
    return tool


def test_a_run_that_lost_all_its_statistics_is_run_again(tmp_path: Path) -> None:
    tool = _flaky_tool(tmp_path, lost_runs=2)
    stats = kl_divergence(tool, tmp_path / "q.gguf", tmp_path / "base.logits", 32, 2, chunk=3)
    assert stats["mean_kld"] == 0.005 and stats["same_top_p"] == 88.889
    assert (tmp_path / "runs").read_text().strip() == "3"


def test_a_run_that_loses_its_statistics_every_time_is_an_error_naming_the_runs(
    tmp_path: Path,
) -> None:
    tool = _flaky_tool(tmp_path, lost_runs=3)
    with pytest.raises(EvalError, match=r"no KL-divergence statistics .*\(3 runs\)"):
        kl_divergence(tool, tmp_path / "q.gguf", tmp_path / "base.logits", 32, 2, chunk=3)
    assert (tmp_path / "runs").read_text().strip() == "3"


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
