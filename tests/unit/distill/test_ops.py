"""Stage command builders: mistakes fail at build time, secrets stay off the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import argspec, ops


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


# ----------------------------------------------------------------------------- bench


def test_the_bench_command_is_built_like_every_stage() -> None:
    command = ops.build("bench", only=["decode", "labelling"], threads=4, out=Path("r"))
    assert command.argv == [
        "distill",
        "bench",
        "--out",
        "r",
        "--only",
        "decode",
        "labelling",
        "--threads",
        "4",
    ]
    assert ops.build("bench").argv == ["distill", "bench"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rows": 0}, "--rows must be positive, got 0"),
        ({"threads": -1}, "--threads must be positive, got -1"),
        ({"only": ["decoding"]}, "only: unknown section(s) decoding"),
    ],
    ids=["no rows", "negative threads", "a section that does not exist"],
)
def test_bench_mistakes_fail_when_built(values: dict, message: str) -> None:
    with pytest.raises(ops.OpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.build("bench", **values)


def test_the_bench_sections_are_distill_benchs() -> None:
    from distill import bench

    assert sorted(bench.SECTIONS) == list(ops.BENCH_SECTIONS)


def test_the_cli_parses_the_built_bench_command() -> None:
    from distill.cli import _parser

    original = ops.BenchArgs(out=Path("o"), only=["agent"], rows=3, distill_steps=2)
    command = ops.build("bench", out=Path("o"), only=["agent"], rows=3, distill_steps=2)
    namespace = _parser().parse_args(command.argv[1:])
    assert argspec.parse_into(ops.BenchArgs, namespace) == original


def test_distill_bench_runs_a_section_and_writes_its_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fleet section only reads fleet.csv: a real, cheap run of the built command."""
    from distill import cli

    (tmp_path / "fleet.csv").write_text(
        "measure,mode,hosts,seconds,uplink_mb,rerun_received_mb,rerun_changed\n"
        "no-change site.yml,,4,12.5,,,\n"
    )
    command = ops.build("bench", only=["fleet"], out=tmp_path)
    assert cli.main(command.argv[1:]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary == {
        "out": str(tmp_path),
        "sections": ["fleet"],
        "markdown": str(tmp_path / "bench.md"),
        "csv": str(tmp_path / "bench.csv"),
    }
    assert "| fleet | no-change site.yml N=4 | 12.5 | s |" in (tmp_path / "bench.md").read_text()
    assert "# pidistill benchmarks" in captured.err  # the report, off stdout


def test_the_makefile_benchmarks_through_the_shared_command() -> None:
    makefile = (Path(__file__).resolve().parents[3] / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/distill bench " in recipe
