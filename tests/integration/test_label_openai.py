"""`distill label --teacher-url`: a real llama-server (the tiny GGUF) answers, several at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import label as label_stage
from distill.label import LabelArgs, LabelError
from distill.llamacpp import serve
from distill.records import read_records

pytestmark = [pytest.mark.llamacpp]


def write_prompts(path: Path, n: int) -> Path:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            needs_json = i == 0
            handle.write(
                json.dumps(
                    {
                        "id": f"s{i}",
                        "system_hint": "Réponds en québécois.",
                        "user": f"Question numéro {i}: c'est quoi une tuque?",
                        "requires_json": needs_json,
                        "json_schema": schema if needs_json else None,
                        "metadata": {
                            "register": "familier",
                            "dialect": "québécois",
                            "provenance": {"source": "t"},
                        },
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return path


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_server_teacher_labels_every_row(tmp_path: Path, tiny_gguf: Path, style: str) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 9)
    with serve(tiny_gguf, parallel=4, ctx_size=512) as url:
        args = LabelArgs(
            input=source,
            output=tmp_path / "out.jsonl",
            teacher_url=url,
            concurrency=4,
            batch_size=4,
            max_new_tokens=8,
            prompt_style=style,
            json_retries=1,
            quality_gate=False,  # eight tokens of a random model are no sentence
        )
        summary = label_stage.label(args)
    assert summary.labelled + summary.rejected == 9
    assert summary.tokens > 0
    done = [r.id for r in read_records(args.output, allow_empty=True)]
    rejected = (
        [json.loads(line)["id"] for line in args.rejects_path.read_text().splitlines()]
        if args.rejects_path.exists()
        else []
    )
    assert sorted(done + rejected) == sorted(f"s{i}" for i in range(9))
    labelled = read_records(args.output)
    labeller = labelled[0].metadata["provenance"]["labeller"]
    assert labeller["backend"] == "openai"
    assert labeller["prompt_style"] == style
    assert labeller["server"] == f"{url}/v1"


def test_a_server_that_goes_away_stops_the_run_without_losing_rows(tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 2)
    args = LabelArgs(
        input=source,
        output=tmp_path / "out.jsonl",
        teacher_url="http://127.0.0.1:9",
        request_timeout=2,
    )
    with pytest.raises(LabelError, match="unreachable"):
        label_stage.label(args)
    assert not args.output.exists() or args.output.read_text() == ""


def test_server_teacher_holds_json_to_its_schema_and_keeps_logprobs(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    from distill.logprobs import read_for

    source = write_prompts(tmp_path / "in.jsonl", 4)
    with serve(tiny_gguf, parallel=2, ctx_size=512) as url:
        args = LabelArgs(
            input=source,
            output=tmp_path / "out.jsonl",
            teacher_url=url,
            concurrency=2,
            max_new_tokens=64,
            json_retries=0,
            quality_gate=False,
            logprobs=3,
        )
        summary = label_stage.label(args)
    # The random tiny model writes the object only because response_format holds it there.
    rejects = args.rejects_path.read_text() if args.rejects_path.exists() else ""
    assert summary.rejected == 0, rejects
    rows = {r.id: r for r in read_records(args.output)}
    assert json.loads(rows["s0"].assistant) in ({"ok": True}, {"ok": False})
    for row in rows.values():
        block = read_for(row)
        assert block is not None and block.k == 3 and block.tokens > 0
        assert (block.top_logprobs[:, :-1] >= block.top_logprobs[:, 1:]).all()
    assert rows["s0"].metadata["provenance"]["labeller"]["logprobs"]["k"] == 3
