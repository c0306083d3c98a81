"""``distill label`` with a real (tiny) transformers teacher: batches, JSON checks, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill import label as label_stage
from distill.label import Answer, Generation, LabelArgs, LabelError
from distill.logprobs import TokenLogprobs
from distill.records import Record, iter_json_lines, read_records

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def prompts(path: Path, n: int = 10, json_every: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            needs_json = bool(json_every) and i % json_every == 0
            row = {
                "id": f"p{i:02d}",
                "system_hint": "Réponds en québécois.",
                "user": "Salut! " + "Comment ça va? " * (i % 4 + 1),
                "requires_json": needs_json,
                "json_schema": SCHEMA if needs_json else None,
                "split": "train",
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "test"},
                },
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def ids(path: Path) -> list[str]:
    return [row["id"] for _, row in iter_json_lines(path)] if path.exists() else []


def test_labels_every_row_in_input_order_with_provenance(tmp_path: Path, tiny_model: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", n=7)
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher=str(tiny_model),
        batch_size=3,
        max_new_tokens=6,
        quality_gate=False,  # a random model's six tokens are no sentence
    )
    summary = label_stage.label(args)
    assert (summary.labelled, summary.rejected, summary.skipped) == (7, 0, 0)
    assert summary.tokens > 0
    rows = read_records(args.output, require_answer=True)
    assert [r.id for r in rows] == [f"p{i:02d}" for i in range(7)]
    labeller = rows[0].metadata["provenance"]["labeller"]
    assert labeller["backend"] == "transformers"
    assert labeller["model"] == str(tiny_model)
    assert labeller["prompt_style"] == "chat"
    assert labeller["generation"] == {
        "max_new_tokens": 6,
        "do_sample": False,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    assert rows[0].metadata["provenance"]["source"] == "test"


def test_invalid_json_answers_are_retried_then_rejected_with_a_reason(
    tmp_path: Path, tiny_model: Path
) -> None:
    source = prompts(tmp_path / "in.jsonl", n=6, json_every=2)
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher=str(tiny_model),
        batch_size=4,
        max_new_tokens=4,
        json_retries=2,
        constrain_json=False,  # the retry path is what is under test
        quality_gate=False,
    )
    summary = label_stage.label(args)
    # A randomly initialised model never writes valid JSON: every JSON row is rejected.
    assert summary.rejected == 3
    assert summary.retried == 6
    assert ids(args.output) == ["p01", "p03", "p05"]
    rejects = [row for _, row in iter_json_lines(args.rejects_path)]
    assert sorted(r["id"] for r in rejects) == ["p00", "p02", "p04"]
    for reject in rejects:
        assert "assistant" not in reject
        assert reject["reject"]["attempts"] == 3
        assert reject["reject"]["reason"]
        assert reject["metadata"]["provenance"]["labeller"]["generation"]["do_sample"] is True


class ScriptedTeacher:
    """A teacher whose answers a test chooses: the JSON retry logic is what is under test."""

    style = "plain"

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], Generation]] = []

    def answer(self, records: list[Record], gen: Generation) -> list[Answer]:
        self.calls.append(([r.id for r in records], gen))
        return [Answer(self.answers[r.id].pop(0), 3) for r in records]

    def prompt_tokens(self, records: list[Record]) -> list[int]:
        return [len(r.user) for r in records]

    def describe(self) -> dict:
        return {"backend": "scripted", "model": "script", "revision": None}


def test_a_json_row_fixed_by_a_retry_is_kept_with_its_attempt_count(tmp_path: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", n=2, json_every=2)
    teacher = ScriptedTeacher({"p00": ["pas du JSON", '{"ok": true}'], "p01": ["Allô!"]})
    args = LabelArgs(
        input=source, output=tmp_path / "out.jsonl", json_retries=2, retry_temperature=0.4
    )
    summary = label_stage.label(args, teacher=teacher)
    assert (summary.labelled, summary.rejected, summary.retried) == (2, 0, 1)
    # JSON rows batch apart from free ones; the retry follows its batch.
    first, retry, free = teacher.calls
    assert (first[0], retry[0], free[0]) == (["p00"], ["p00"], ["p01"])
    assert first[1].repetition_penalty == 1.0 and free[1].repetition_penalty > 1.0
    assert retry[1].do_sample and retry[1].temperature == pytest.approx(0.4)
    rows = {r.id: r for r in read_records(args.output)}
    assert rows["p00"].assistant == '{"ok": true}'
    assert rows["p00"].metadata["provenance"]["labeller"]["attempts"] == 2


def test_an_answer_cut_mid_sentence_is_trimmed_to_its_last_sentence_or_rejected(
    tmp_path: Path,
) -> None:
    source = prompts(tmp_path / "in.jsonl", n=3)
    block = TokenLogprobs(
        np.arange(6, dtype=np.int32), np.zeros((6, 2), np.int32), np.zeros((6, 2), np.float32)
    )
    short = TokenLogprobs(block.token_ids[:4], block.top_ids[:4], block.top_logprobs[:4])
    cut = Answer("Allô! Ça va bien. Pis toi, tu", 6, False, block)
    cut.trimmed = Answer("Allô! Ça va bien.", 4, False, short, cut_from=6)
    answers = {
        "p00": cut,
        "p01": Answer("Une phrase qui ne finit", 6, False),  # nothing to keep
        "p02": Answer("Correct.", 2, True),
    }

    class Cutting(ScriptedTeacher):
        def answer(self, records: list[Record], gen: Generation) -> list[Answer]:
            return [answers[r.id] for r in records]

    args = LabelArgs(input=source, output=tmp_path / "out.jsonl", logprobs=2)
    summary = label_stage.label(args, teacher=Cutting({}))
    assert (summary.labelled, summary.rejected, summary.trimmed) == (2, 1, 1)
    rows = {r.id: r for r in read_records(args.output)}
    assert rows["p00"].assistant == "Allô! Ça va bien."
    labeller = rows["p00"].metadata["provenance"]["labeller"]
    assert labeller["trimmed"] == {"from_tokens": 6, "to": 4}
    from distill.logprobs import read_for

    assert read_for(rows["p00"]).tokens == 4  # the kept tokens' probabilities only
    reject = next(iter_json_lines(args.rejects_path))[1]
    assert reject["id"] == "p01" and reject["reject"]["reason"].startswith("truncated")
    # With trimming off, the cut answer is rejected like any other.
    off = LabelArgs(input=source, output=tmp_path / "off.jsonl", trim_truncated=False)
    assert label_stage.label(off, teacher=Cutting({})).rejected == 2


def test_skip_existing_skips_labelled_and_rejected_ids(tmp_path: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", n=4)
    args = LabelArgs(input=source, output=tmp_path / "out.jsonl", skip_existing=True)
    first = ScriptedTeacher({"p00": ["a"], "p01": ["b"], "p02": ["c"], "p03": ["d"]})
    label_stage.label(LabelArgs(input=source, output=args.output, limit=2), teacher=first)
    (tmp_path / "out.rejects.jsonl").write_text(json.dumps({"id": "p02"}) + "\n")
    second = ScriptedTeacher({"p03": ["d"]})
    summary = label_stage.label(args, teacher=second)
    assert summary.skipped_ids == ["p00", "p01", "p02"]
    assert [call[0] for call in second.calls] == [["p03"]]
    assert ids(args.output) == ["p00", "p01", "p03"]


def test_a_torn_last_line_is_repaired_on_resume(tmp_path: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", n=3)
    output = tmp_path / "out.jsonl"
    label_stage.label(
        LabelArgs(input=source, output=output, limit=1), teacher=ScriptedTeacher({"p00": ["a"]})
    )
    with output.open("ab") as handle:
        handle.write(b'{"id": "p01", "system_hint": "R')
    summary = label_stage.label(
        LabelArgs(input=source, output=output, skip_existing=True),
        teacher=ScriptedTeacher({"p01": ["b"], "p02": ["c"]}),
    )
    assert summary.labelled == 2
    assert ids(output) == ["p00", "p01", "p02"]


def test_an_existing_output_is_not_overwritten_silently(tmp_path: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", n=1)
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "old"}\n')
    with pytest.raises(LabelError, match="--skip-existing resumes, --overwrite replaces"):
        label_stage.label(
            LabelArgs(input=source, output=output), teacher=ScriptedTeacher({"p00": ["a"]})
        )
    assert output.read_text() == '{"id": "old"}\n'


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"max_new_tokens": -1}, "--max-new-tokens must be positive"),
        ({"teacher": "x", "teacher_url": "http://127.0.0.1:1"}, "pick one"),
        ({"skip_existing": True, "overwrite": True}, "pick one"),
        ({"top_p": 0}, "--top-p"),
        ({"output": Path("in.jsonl")}, "--output must differ from --input"),
        ({"logprobs": 257}, r"--logprobs must be in \[0, 256\] with a local teacher"),
        ({"logprobs": 21, "teacher_url": "http://127.0.0.1:1"}, r"\[0, 20\] with --teacher-url"),
    ],
    ids=[
        "zero batch size",
        "negative token budget",
        "two teachers",
        "resume and overwrite",
        "zero top-p",
        "output over input",
        "more log-probabilities than the local store keeps",
        "more log-probabilities than a server returns",
    ],
)
def test_bad_arguments_fail_before_anything_runs(changes: dict, message: str) -> None:
    values = {"input": Path("in.jsonl"), "output": Path("out.jsonl"), **changes}
    with pytest.raises(ValueError, match=message):
        LabelArgs(**values)


def test_json_rows_are_held_to_their_schema_while_generating(
    tmp_path: Path, tiny_model: Path
) -> None:
    source = prompts(tmp_path / "in.jsonl", n=6, json_every=1)
    common = {"input": source, "teacher": str(tiny_model), "max_new_tokens": 24}
    held = LabelArgs(output=tmp_path / "held.jsonl", json_retries=0, **common)
    summary = label_stage.label(held)
    assert (summary.labelled, summary.rejected) == (6, 0)
    for row in read_records(held.output):
        assert json.loads(row.assistant) in ({"ok": True}, {"ok": False})
    # The same random model without the grammar never writes that object.
    free = LabelArgs(output=tmp_path / "free.jsonl", json_retries=0, constrain_json=False, **common)
    assert label_stage.label(free).rejected == 6


def test_logprobs_are_recorded_per_answer_token(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from distill.logprobs import read_for, vocab_hash

    source = prompts(tmp_path / "in.jsonl", n=5, json_every=2)
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher=str(tiny_model),
        max_new_tokens=24,
        quality_gate=False,
        json_retries=0,  # a retry samples; the greedy check below holds for first attempts
        logprobs=5,
        # Without the loop guards, the greedy pick is the best of the recorded distribution.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )
    summary = label_stage.label(args)
    assert summary.labelled == 5 and summary.logprobs == str(args.logprobs_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in read_records(args.output):
        labeller = row.metadata["provenance"]["labeller"]
        assert labeller["vocab_hash"] == vocab_hash(tokenizer)
        assert labeller["logprobs"]["k"] == 5
        block = read_for(row)
        assert block is not None and block.k == 5 and block.tokens == len(block.token_ids)
        text = tokenizer.decode(block.token_ids.tolist(), skip_special_tokens=True).strip()
        assert text == row.assistant
        # Greedy: every token is a best of the distribution it was picked from (bf16 ties).
        chosen = block.top_ids == block.token_ids[:, None]
        assert chosen.any(axis=1).all()
        assert np.allclose(block.top_logprobs[chosen], block.top_logprobs[:, 0])
        assert (block.top_logprobs[:, :-1] >= block.top_logprobs[:, 1:]).all()
        assert (block.top_logprobs <= 0).all()
        if row.requires_json:
            # Under the grammar, the forbidden tokens have no mass: the top few hold it all.
            assert np.exp(block.top_logprobs).sum(axis=1).min() > 0.999


def test_recorded_logprobs_are_the_teachers_own_not_the_loop_guards(
    tmp_path: Path, tiny_model: Path
) -> None:
    """With the repetition penalty and no-repeat n-gram on, what is stored is still the
    teacher's distribution: the same as reading prompt + answer teacher-forced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.logprobs import read_for
    from distill.records import render_prompt

    source = prompts(tmp_path / "in.jsonl", n=4, json_every=0)
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher=str(tiny_model),
        dtype="float32",
        batch_size=1,
        max_new_tokens=24,
        quality_gate=False,
        logprobs=5,
        repetition_penalty=2.0,
        no_repeat_ngram_size=2,
    )
    assert label_stage.label(args).labelled == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    steered = 0
    for row in read_records(args.output):
        assert (
            "before the loop guards"
            in row.metadata["provenance"]["labeller"]["logprobs"]["distribution"]
        )
        block = read_for(row)
        assert block is not None
        style = row.metadata["provenance"]["labeller"]["prompt_style"]
        prompt = tokenizer(
            render_prompt(row, style, tokenizer), add_special_tokens=style == "plain"
        )
        ids = torch.tensor([prompt["input_ids"] + block.token_ids.tolist()])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt["input_ids"]) - 1 : -1]
        own = torch.log_softmax(logits.float(), dim=-1).numpy()
        stored = np.take_along_axis(own, block.top_ids.astype(np.int64), axis=1)
        assert np.allclose(block.top_logprobs, stored, atol=2e-2)  # float16 on disk
        assert (block.top_ids[:, 0] == own.argmax(axis=1)).all()
        steered += int((block.top_ids[:, 0] != block.token_ids).sum())
    # The guards did steer the picks away from the teacher's best somewhere.
    assert steered > 0


def test_user_only_and_conversation_rows_are_labelled_on_the_last_user_turn(
    tmp_path: Path, tiny_model: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.records import render_prompt

    history = [
        {"role": "user", "content": "Allo! Ça va-tu?"},
        {"role": "assistant", "content": "Oui, pis toi?"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"user": "Y fait-tu frette dehors?"}\n'
        + json.dumps({"history": history, "user": "Ben correct. Tu fais quoi à soir?"})
        + "\n",
        encoding="utf-8",
    )
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher=str(tiny_model),
        batch_size=1,
        max_new_tokens=6,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        quality_gate=False,
    )
    summary = label_stage.label(args)
    assert (summary.labelled, summary.rejected) == (2, 0)
    plain, talk = read_records(args.output, require_answer=True)
    assert [r.id for r in (plain, talk)] == [r.id for r in read_records(source)]
    assert plain.id_derived and talk.id_derived
    assert list(talk.history) == history
    # The answer is the teacher's greedy continuation of the whole conversation.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = tokenizer(render_prompt(talk, "chat", tokenizer), return_tensors="pt",
                      add_special_tokens=False)  # fmt: skip
    assert "Oui, pis toi?" in tokenizer.decode(batch["input_ids"][0])
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None
        )
    expected = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert talk.assistant == expected.strip()
    # Derived ids are the same on the next run: a resume skips both rows.
    again = label_stage.label(
        LabelArgs(input=source, output=args.output, teacher=str(tiny_model), skip_existing=True)
    )
    assert (again.skipped, again.labelled) == (2, 0)
