"""The ``distill`` command line: bad input ends in one line, exit 2, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill import cli

GOOD = {
    "id": "r1",
    "system_hint": "",
    "user": "Allô",
    "requires_json": False,
    "json_schema": None,
    "metadata": {"register": "familier", "dialect": "québécois", "provenance": {"source": "t"}},
}
BAD_INPUTS = {
    "malformed JSON": ("{not json}\n", 1, "(json)"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "user"}) + "\n", 1, "user"),
    "ill-typed field": (json.dumps({**GOOD, "requires_json": 1}) + "\n", 1, "requires_json"),
    "duplicate id": (json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", 2, "id"),
    "invalid json_schema": (
        json.dumps({**GOOD, "requires_json": True, "json_schema": {"type": 3}}) + "\n",
        1,
        "json_schema",
    ),
    "empty file": ("", 1, "(file)"),
    "non-UTF-8 bytes": (b'{"id": "\xff"}\n', 1, "(encoding)"),
}


@pytest.mark.parametrize("command", ["label", "card"])
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: tuple
) -> None:
    content, line, field = case
    source = tmp_path / "in.jsonl"
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / ("out.jsonl" if command == "label" else "card.md")
    code = cli.main([command, "--input", str(source), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"distill {command}: error: {source}:{line}: {field}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_missing_input_file_is_bad_input(tmp_path: Path, capsys) -> None:
    code = cli.main(
        ["label", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    )
    assert code == 2
    assert "nope.jsonl:0: (file): no such file" in capsys.readouterr().err


def test_config_file_values_sit_under_flags(tmp_path: Path, capsys) -> None:
    config = tmp_path / "label.yaml"
    config.write_text("batch-size: 0\nmax_new_tokens: 5\n")
    code = cli.main(["label", "--config", str(config), "--input", "a.jsonl", "--output", "b.jsonl"])
    assert code == 2
    assert "--batch-size must be positive, got 0" in capsys.readouterr().err
    code = cli.main(
        [
            "label",
            "--config",
            str(config),
            "--batch-size",
            "2",
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output",
            str(tmp_path / "b.jsonl"),
        ]
    )
    assert "a.jsonl:0: (file): no such file" in capsys.readouterr().err


def test_an_unknown_config_key_names_the_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "label.yaml"
    config.write_text("batch_sise: 4\n")
    assert cli.main(["label", "--config", str(config), "--input", "a", "--output", "b"]) == 2
    assert f"{config}: batch_sise: unknown option" in capsys.readouterr().err


def test_an_unreachable_teacher_server_exits_1(tmp_path: Path, capsys, sample_files) -> None:
    code = cli.main(
        [
            "label",
            "--input",
            str(sample_files[0]),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--teacher-url",
            "http://127.0.0.1:9",
        ]
    )
    assert code == 1
    assert "teacher server http://127.0.0.1:9/v1 unreachable" in capsys.readouterr().err


def test_help_is_instant_because_torch_is_not_imported() -> None:
    code = "import sys, distill.cli; distill.cli._parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- flag spellings

SEED_SPELLINGS = {
    "label's batch size": (
        ["label", "--batch_size", "4", "--input", "a", "--output", "b"],
        {"batch_size": 4},
    ),
    "a switch": (
        ["label", "--skip_existing", "--input", "a", "--output", "b"],
        {"skip_existing": True},
    ),
    "a switch turned off": (
        ["label", "--no_skip_existing", "--input", "a", "--output", "b"],
        {"skip_existing": False},
    ),
    "a value after '='": (
        ["label", "--max_new_tokens=12", "--input", "a", "--output", "b"],
        {"max_new_tokens": 12},
    ),
    "train's LoRA rank": (
        ["train", "--lora_rank", "8", "--data", "a", "--output", "b"],
        {"lora_rank": 8},
    ),
    "both spellings mixed": (
        ["export", "--model", "m", "--output_dir", "d", "--token-embedding_type", "f16"],
        {"output_dir": Path("d"), "token_embedding_type": "f16"},
    ),
}


@pytest.mark.parametrize("case", SEED_SPELLINGS.values(), ids=SEED_SPELLINGS.keys())
def test_the_seeds_underscore_flags_are_accepted(case: tuple) -> None:
    argv, expected = case
    namespace = cli._parser().parse_args(argv)
    for name, value in expected.items():
        assert getattr(namespace, name) == value


def test_help_lists_only_the_hyphenated_flags(capsys) -> None:
    for stage in ("label", "train", "export"):
        with pytest.raises(SystemExit):
            cli._parser().parse_args([stage, "--help"])
        shown = capsys.readouterr().out
        assert "--batch-size" in shown or "--output-dir" in shown
        assert not [w for w in shown.split() if w.startswith("--") and "_" in w], stage


@pytest.mark.parametrize("flag", ["--batch_sise", "--batch-sise", "--bogus_flag"])
def test_an_unknown_flag_is_still_an_error(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["label", flag, "4", "--input", "a", "--output", "b"])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {flag} 4" in capsys.readouterr().err


def test_an_underscore_value_after_a_double_dash_is_left_alone() -> None:
    from distill import argspec

    parser = argspec.ArgumentParser()
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("rest", nargs="*")
    namespace = parser.parse_args(["--batch_size", "2", "--", "--batch_size"])
    assert (namespace.batch_size, namespace.rest) == (2, ["--batch_size"])


def test_distill_label_runs_with_the_seeds_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A real labelling run (a teacher server that is not there) gets past the parser."""
    caplog.set_level("INFO", logger="distill")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(GOOD) + "\n")
    argv = ["label", "--input", str(source), "--output", str(tmp_path / "out.jsonl")]
    argv += ["--batch_size", "4", "--max_new_tokens", "8", "--skip_existing"]
    argv += ["--teacher_url", "http://127.0.0.1:9"]
    assert cli.main(argv) == 1
    assert "teacher server http://127.0.0.1:9/v1 unreachable" in capsys.readouterr().err
    assert "'batch_size': 4" in caplog.text and "'skip_existing': True" in caplog.text
    assert "'max_new_tokens': 8" in caplog.text
