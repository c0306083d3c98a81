"""Stage command builders: mistakes fail at build time, secrets stay off the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill import ops


def test_label_command_lists_only_what_differs_from_defaults() -> None:
    command = ops.build(
        "label",
        input=Path("in.jsonl"),
        output=Path("out.jsonl"),
        batch_size=32,
        do_sample=True,
        skip_existing=True,
    )
    assert command.argv == [
        "distill",
        "label",
        "--input",
        "in.jsonl",
        "--output",
        "out.jsonl",
        "--batch-size",
        "32",
        "--do-sample",
        "--skip-existing",
    ]
    assert command.env == {}


def test_secrets_travel_in_the_environment() -> None:
    command = ops.build("label", input="a", output="b", teacher="org/model", hf_token="hf_secret")
    assert "hf_secret" not in command.shell()
    assert command.env == {"HF_TOKEN": "hf_secret"}


@pytest.mark.parametrize(
    ("stage", "values", "message"),
    [
        ("label", {"input": "a", "output": "b", "batch_size": 0}, "--batch-size must be positive"),
        ("label", {"output": "b"}, "missing required field(s): input"),
        ("label", {"input": "a", "output": "b", "batch": 3}, "unknown option(s): batch"),
        ("card", {"input": [], "output": "c.md"}, "missing required field(s): input"),
        ("card", {"input": ["a"], "output": "c.txt"}, "Markdown file"),
        ("nope", {}, "unknown stage 'nope'"),
    ],
    ids=[
        "non-positive batch size",
        "missing input",
        "misspelt option",
        "card without input",
        "card not in Markdown",
        "unknown stage",
    ],
)
def test_mistakes_fail_when_the_command_is_built(stage: str, values: dict, message: str) -> None:
    with pytest.raises(ops.OpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.build(stage, **values)


def test_the_cli_parses_what_the_builder_wrote() -> None:
    from distill import argspec
    from distill.cli import _parser
    from distill.label import LabelArgs

    original = LabelArgs(
        input=Path("in.jsonl"),
        output=Path("o.jsonl"),
        batch_size=5,
        temperature=0.2,
        limit=3,
        do_sample=True,
    )
    command = ops.build(
        "label",
        **{
            k: getattr(original, k)
            for k in ("input", "output", "batch_size", "temperature", "limit", "do_sample")
        },
    )
    parsed = argspec.parse_into(LabelArgs, _parser().parse_args(command.argv[1:]))
    assert parsed == original


def test_fields_describe_each_flag_for_forms() -> None:
    fields = {f["name"]: f for f in ops.fields("label")}
    assert fields["input"]["required"] and fields["input"]["flag"] == "--input"
    assert fields["batch_size"]["default"] == 16
    assert fields["hf_token"]["secret"]
    assert fields["prompt_style"]["choices"] == ("auto", "plain", "chat")
