"""``distill eval`` pieces that need no llama.cpp: perplexity, the card's table, arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.card_model import eval_table, render_card
from distill.evaluate import EvalArgs, EvalError, llama_perplexity


def test_bad_arguments_fail_at_parse_time() -> None:
    with pytest.raises(ValueError, match="ppl_ctx"):
        EvalArgs(run_dir=Path("r"), ppl_ctx=8)
    with pytest.raises(ValueError, match="max_prompts"):
        EvalArgs(run_dir=Path("r"), max_prompts=0)
    assert EvalArgs(run_dir=Path("r"), agreement_quant="q8_0").agreement_quant == "Q8_0"


def test_answer_perplexity_counts_only_answer_tokens(tiny_model: Path) -> None:
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from distill.encoding import Example, answer_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = list(range(10, 30))
    answer_only = Example("a", ids, [-100] * 15 + ids[15:])
    with_prompt = Example("b", ids, ids)
    ppl = answer_perplexity(model, [answer_only], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, 14:19]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[15:20]))
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-3)
    assert answer_perplexity(model, [with_prompt], pad_id=0) != ppl
    assert answer_perplexity(model, [], pad_id=0) is None


def test_card_table_shows_goals_and_every_quant() -> None:
    evaluation = {
        "heldout_rows": 6,
        "perplexity": {"before": 20.0, "after": 9.5},
        "json": {"rows": 2, "student_valid_rate": 0.5, "teacher_valid_rate": 1.0},
        "gguf": {
            "goal": {"quant": "Q8_0", "top1_agreement_at_least": 0.99},
            "perplexity_ctx": 128,
            "tokens_per_prompt": 32,
            "hf_perplexity": 9.6,
            "quants": [
                {"quant": "Q8_0", "file": "s-Q8_0.gguf", "mib": 1.0, "top1_agreement": 0.995,
                 "perplexity": 9.61},
                {"quant": "Q4_K_M", "file": "s-Q4_K_M.gguf", "mib": 0.6, "top1_agreement": 0.95,
                 "perplexity": 10.2},
            ],
        },
    }  # fmt: skip
    table = eval_table(evaluation)
    assert "| answer perplexity after training | 9.5 | below before |" in table
    assert "| Q8_0 vs HF next-token top-1 agreement | 99.5% | at least 99.0% |" in table
    assert "| s-Q4_K_M.gguf | 0.6 | 10.2 | 95.0% |" in table
    card = render_card({"config": {"method": "lora"}, "versions": {"torch": "2"}}, evaluation)
    assert card.startswith("---\n") and "| torch | 2 |" in card and table.strip() in card
    assert "Not evaluated yet" in eval_table(None)


# What llama-perplexity prints: the running estimates on stdout, the final one on stderr, and
# no final one when the log-likelihood has no spread (a non-finite perplexity).
PERPLEXITY_OUTPUTS = {
    "a final estimate": ("[1]12.5,[2]11.0,", "Final estimate: PPL = 11.0123 +/- 0.5", 11.0123),
    "no spread, finite": ("[1]12.5,[2]11.25,", "Unexpected negative standard deviation", 11.25),
    "no spread, overflow": ("[1]inf,[2]nan,", "Unexpected negative standard deviation", None),
}


@pytest.mark.parametrize(
    ("stdout", "stderr", "expected"), PERPLEXITY_OUTPUTS.values(), ids=PERPLEXITY_OUTPUTS.keys()
)
def test_llama_perplexity_reads_every_ending(
    tmp_path: Path, stdout: str, stderr: str, expected: float | None
) -> None:
    tool = tmp_path / "llama-perplexity"
    tool.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nprintf '%s\\n' '{stderr}' >&2\n")
    tool.chmod(0o755)
    text = tmp_path / "t.txt"
    assert llama_perplexity(tool, tmp_path / "m.gguf", text, 32, None) == expected


def test_llama_perplexity_without_any_estimate_names_the_command(tmp_path: Path) -> None:
    tool = tmp_path / "llama-perplexity"
    tool.write_text("#!/bin/sh\necho 'perplexity: tokenizing the input ..' >&2\n")
    tool.chmod(0o755)
    with pytest.raises(EvalError, match=r"llama-perplexity .*no perplexity(.|\n)*stderr: perp"):
        llama_perplexity(tool, tmp_path / "m.gguf", tmp_path / "t.txt", 32, None)
