"""``distill eval`` in HF, no llama.cpp: agreement and KL, answers, JSON rates, vocabularies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distill.evaluate import EvalArgs, EvalError
from distill.evaluate.agreement import Agreement, teacher_forced
from distill.evaluate.answers import answer_scores, generate, json_rates, prompt_ids
from distill.evaluate.heldout import check_same_vocab


def test_bad_arguments_fail_at_parse_time() -> None:
    with pytest.raises(ValueError, match="ppl_ctx"):
        EvalArgs(run_dir=Path("r"), ppl_ctx=8)
    with pytest.raises(ValueError, match="max_prompts"):
        EvalArgs(run_dir=Path("r"), max_prompts=0)
    with pytest.raises(ValueError, match="batch_size"):
        EvalArgs(run_dir=Path("r"), batch_size=0)
    assert EvalArgs(run_dir=Path("r"), goal_quant="q8_0").goal_quant == "Q8_0"


def test_agreement_and_kl_on_hand_computed_logits() -> None:
    import torch

    # Row 1: teacher p = (1/4, 3/4), student q = (3/4, 1/4): top-1 differs and
    # KL(p || q) = 1/4 ln(1/3) + 3/4 ln 3 = ln(3) / 2. Row 2: the same logits, KL 0, agree.
    teacher = torch.tensor([[0.0, math.log(3)], [2.0, -1.0]])
    student = torch.tensor([[math.log(3), 0.0], [2.0, -1.0]])
    agreement = Agreement()
    agreement.add(teacher, student)
    summary = agreement.summary()
    assert summary["tokens"] == 2
    assert summary["top1_agreement"] == 0.5
    assert summary["mean_kl"] == pytest.approx(math.log(3) / 4, abs=1e-5)
    # KL is not symmetric in general, but here the rows mirror each other: the same number.
    reverse = Agreement()
    reverse.add(student, teacher)
    assert reverse.summary()["mean_kl"] == pytest.approx(summary["mean_kl"], abs=1e-5)
    skewed = Agreement()
    skewed.add(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, math.log(4)]]))
    # p uniform over 3, q = (1/6, 1/6, 4/6): KL = ln(1/3) - (2 ln(1/6) + ln(4/6)) / 3
    expected = math.log(1 / 3) - (2 * math.log(1 / 6) + math.log(4 / 6)) / 3
    assert skewed.summary()["mean_kl"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="different shapes"):
        agreement.add(teacher, student[:1])
    assert Agreement().summary() == {
        "answer_perplexity": None, "top1_agreement": None, "mean_kl": None, "tokens": 0
    }  # fmt: skip


def test_teacher_forced_counts_answer_tokens_only(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.encoding import Example, answer_perplexity

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn_like(param))
    short = Example("a", list(range(10, 22)), [-100] * 8 + list(range(18, 22)))
    long = Example("b", list(range(30, 50)), [-100] * 15 + list(range(45, 50)))
    vocab = teacher.config.vocab_size
    result = teacher_forced(teacher, {"same": teacher, "other": student}, [short, long], 0, vocab)
    same = {k: v for k, v in result["same"].items() if k != "answer_perplexity"}
    assert same == {"top1_agreement": 1.0, "mean_kl": 0.0, "tokens": 9}
    # The same pass gives each model's perplexity of the answers, the teacher's too.
    for name, model in (("teacher", teacher), ("same", teacher), ("other", student)):
        alone_ppl = answer_perplexity(model, [short, long], 0)
        assert result[name]["answer_perplexity"] == pytest.approx(alone_ppl, rel=1e-4)
    assert result["other"]["answer_perplexity"] != result["teacher"]["answer_perplexity"]
    # By hand on the second example alone: logits at positions 14..18 predict tokens 15..19.
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=torch.tensor([long.input_ids])).logits[0], -1)
        q = torch.log_softmax(student(input_ids=torch.tensor([long.input_ids])).logits[0], -1)
    p, q = p[14:19], q[14:19]
    alone = teacher_forced(teacher, {"other": student}, [long], 0, vocab)["other"]
    assert alone["tokens"] == 5
    assert alone["mean_kl"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), abs=1e-5)
    assert alone["top1_agreement"] == float((p.argmax(-1) == q.argmax(-1)).float().mean())
    nll = -q.gather(-1, torch.tensor(long.input_ids[15:20])[:, None]).mean()
    assert alone["answer_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert result["other"]["mean_kl"] > 0 and result["other"]["tokens"] == 9


def test_chrf_is_corpus_level_and_exact_match_ignores_outer_whitespace() -> None:
    # "aa" against "ab": 1-grams P = R = 1/2 (F = 1/2), 2-grams none match (F = 0), no longer
    # n-grams: chrF = 100 * (1/2 + 0) / 2 effective orders = 25.
    assert answer_scores(["aa"], ["ab"])["chrf"] == 25.0
    # Two rows: the statistics add up before the F-score (1-grams 2/3, 2-grams 1/1):
    # 100 * (2/3 + 1) / 2 = 83.33, not the mean of the rows' own scores (100 and 0).
    scores = answer_scores(["ab", "x"], ["ab", "y"])
    assert scores == {"rows": 2, "chrf": 83.33, "exact_match": 0.5}
    assert answer_scores([" Ben correct.\n"], ["Ben correct."])["exact_match"] == 1.0
    assert answer_scores([], []) == {"rows": 0, "chrf": None, "exact_match": None}
    with pytest.raises(ValueError, match="1 answers for 2 references"):
        answer_scores(["a"], ["a", "b"])


def test_json_rates_separate_parsing_from_the_schema() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answers = ['{"ok": true}', 'Voici: {"ok": "oui"}', "pas de JSON"]
    assert json_rates(answers, [schema] * 3) == {
        "rows": 3,
        "json_valid": round(2 / 3, 4),
        "schema_valid": round(1 / 3, 4),
    }
    assert json_rates([], []) == {"rows": 0, "json_valid": None, "schema_valid": None}


def test_a_vocabulary_mismatch_names_both_models(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tiny_model)
    assert check_same_vocab(ours, AutoTokenizer.from_pretrained(tiny_model), "t", "s") == len(ours)
    theirs = AutoTokenizer.from_pretrained(tiny_model)
    theirs.add_tokens(["<|extra|>"])
    with pytest.raises(EvalError) as caught:
        check_same_vocab(theirs, ours, "embedded:teacher", "runs/x/model")
    message = str(caught.value)
    assert "embedded:teacher" in message and "runs/x/model" in message
    assert f"({len(ours) + 1} tokens)" in message and "'<|extra|>'" in message


def test_constrained_answers_follow_each_rows_schema_in_order(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.constrain import SchemaConstraint
    from distill.records import Record, check_json_answer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    mood = {"type": "object", "properties": {"mood": {"enum": ["ok", "bof"]}}, "required": ["mood"]}
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    users = ["Salut!", "Comment ça va aujourd'hui, mon ami?", "Allô", "Quoi de neuf?"]
    rows = [Record(f"r{i}", "Réponds.", user, False, None, {}) for i, user in enumerate(users)]
    schemas = [mood, flag, None, mood]
    prompts = prompt_ids(rows, tokenizer)
    constraint = SchemaConstraint(tokenizer, model.config.vocab_size)
    answers = generate(model, tokenizer, prompts, 24, 3, schemas=schemas, constraint=constraint)
    assert len(answers) == 4
    for answer, schema in zip(answers, schemas, strict=True):
        if schema is not None:
            assert check_json_answer(answer, schema) is None, answer
    # A random tiny model left free writes no JSON of its own.
    free = generate(model, tokenizer, prompts[:2], 24, 2)
    assert json_rates(free, [mood, flag])["schema_valid"] == 0.0
