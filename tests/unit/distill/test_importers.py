"""``distill import``: OpenAI chat, ShareGPT, Alpaca and Hugging Face datasets into pidistill rows.

Each test writes a small file of the real format (JSONL, a JSON array, parquet, a
``save_to_disk`` folder) and runs the command as a user would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distill import cli
from distill.encoding import DataError, read_labelled
from distill.importers import ImportArgs, import_rows
from distill.records import read_records, render_prompt

SYSTEM = "Tu es un assistant québécois."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Allo! Ça va-tu?"},
    {"role": "assistant", "content": "Oui, pis toi?"},
    {"role": "user", "content": "Ben correct. Y fait-tu frette à Québec?"},
    {"role": "assistant", "content": "Une réponse venue avec le fichier."},
]


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def run_import(capsys, *argv: str) -> tuple[int, dict[str, Any] | None, str]:
    code = cli.main(["import", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_openai_chat_rows_become_conversations_with_a_reference(tmp_path: Path, capsys) -> None:
    source = jsonl(
        tmp_path / "chats.jsonl",
        [
            {"messages": CHAT},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Salut!"}]}]},
        ],
    )
    output = tmp_path / "rows.jsonl"
    code, summary, err = run_import(capsys, "--input", str(source), "--output", str(output))
    assert code == 0, err
    assert summary == {
        "rows": 2,
        "format": "openai",
        "conversations": 1,
        "with_reference": 1,
        "dropped_duplicates": 0,
        "output": str(output),
    }
    talk, short = read_records(output)
    assert talk.system_hint == SYSTEM
    assert list(talk.history) == [
        {"role": "user", "content": "Allo! Ça va-tu?"},
        {"role": "assistant", "content": "Oui, pis toi?"},
    ]
    assert talk.user == "Ben correct. Y fait-tu frette à Québec?"
    assert talk.reference == "Une réponse venue avec le fichier."
    assert (short.user, short.reference, short.history) == ("Salut!", None, ())
    assert talk.id_derived and talk.split == "train"
    provenance = talk.metadata["provenance"]
    assert provenance["format"] == "openai" and provenance["source"] == "chats.jsonl"
    assert provenance["imported_from"] == f"{source}:1"


def test_the_reference_is_never_the_teachers_answer(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    source = jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    args = ImportArgs(input=source, output=tmp_path / "rows.jsonl")
    (row,), _ = import_rows(args)
    assert "assistant" not in row
    jsonl(args.output, [row])
    (record,) = read_records(args.output)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for prompt in (render_prompt(record, "plain"), render_prompt(record, "chat", tokenizer)):
        assert "Oui, pis toi?" in prompt  # earlier turns are context
        assert "venue avec le fichier" not in prompt  # the reference is not
    with pytest.raises(DataError, match="label them first"):
        read_labelled([args.output])


def test_sharegpt_json_array_is_read_through_datasets(tmp_path: Path, capsys) -> None:
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    conversations = [{"from": speakers[m["role"]], "value": m["content"]} for m in CHAT]
    source = tmp_path / "sharegpt.json"
    source.write_text(
        json.dumps([{"id": "sg-1", "conversations": conversations}], ensure_ascii=False), "utf-8"
    )
    output = tmp_path / "rows.jsonl"
    code, _, err = run_import(
        capsys, "--input", str(source), "--output", str(output), "--format", "sharegpt"
    )
    assert code == 0, err
    (record,) = read_records(output)
    assert (record.id, record.id_derived) == ("sg-1", False)
    assert record.system_hint == SYSTEM and len(record.history) == 2
    assert record.reference == "Une réponse venue avec le fichier."
    assert record.metadata["provenance"]["imported_from"] == f"{source}:row 0"


def test_alpaca_rows_join_instruction_and_input(tmp_path: Path, capsys) -> None:
    source = jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {
                "instruction": "Traduis en québécois.",
                "input": "Il fait très froid.",
                "output": "Y fait frette.",
            },
            {"instruction": "Donne un synonyme de char.", "input": "", "output": ""},
        ],
    )
    output = tmp_path / "rows.jsonl"
    code, summary, err = run_import(
        capsys,
        *("--input", str(source), "--output", str(output), "--license", "cc-by-4.0"),
        *("--register", "familier", "--as-split", "heldout"),
    )
    assert code == 0, err
    first, second = read_records(output)
    assert first.user == "Traduis en québécois.\n\nIl fait très froid."
    assert first.reference == "Y fait frette."
    assert (second.user, second.reference) == ("Donne un synonyme de char.", None)
    assert first.metadata["register"] == "familier" and first.meta("dialect") == "unspecified"
    assert first.metadata["provenance"]["license"] == "cc-by-4.0"
    assert {first.split, second.split} == {"heldout"}
    assert summary["format"] == "alpaca"


def test_map_reads_fields_under_other_names(tmp_path: Path, capsys) -> None:
    dialog = [{"speaker": m["role"], "text": m["content"]} for m in CHAT[1:4]]
    source = jsonl(tmp_path / "odd.jsonl", [{"uid": 42, "dialog": dialog}])
    output = tmp_path / "rows.jsonl"
    code, _, err = run_import(
        capsys,
        *("--input", str(source), "--output", str(output)),
        *("--map", "messages=dialog", "role=speaker", "content=text", "id=uid"),
    )
    assert code == 0, err
    (record,) = read_records(output)
    assert (record.id, record.user, len(record.history), record.reference) == (
        "42",
        "Ben correct. Y fait-tu frette à Québec?",
        2,
        None,
    )


def test_a_parquet_file_with_column_mapping(tmp_path: Path, capsys) -> None:
    import datasets

    source = tmp_path / "qa.parquet"
    datasets.Dataset.from_dict(
        {"question": ["C'est quoi une tuque?", "Pis une mitaine?"], "answer": ["Un bonnet.", None]}
    ).to_parquet(str(source))
    output = tmp_path / "rows.jsonl"
    code, _, err = run_import(
        capsys,
        *("--input", str(source), "--output", str(output), "--format", "rows"),
        *("--map", "user=question", "reference=answer"),
    )
    assert code == 0, err
    first, second = read_records(output)
    assert (first.user, first.reference) == ("C'est quoi une tuque?", "Un bonnet.")
    assert (second.user, second.reference) == ("Pis une mitaine?", None)
    assert first.metadata["provenance"]["imported_from"] == f"{source}:row 0"


def test_a_saved_dataset_folder_picks_its_split(tmp_path: Path, capsys) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"messages": [[CHAT[1]]]}),
            "test": datasets.Dataset.from_dict({"messages": [CHAT[1:4], [CHAT[3]]]}),
        }
    ).save_to_disk(str(folder))
    output = tmp_path / "rows.jsonl"
    code, summary, err = run_import(
        capsys, "--input", str(folder), "--output", str(output), "--split", "test"
    )
    assert code == 0, err
    assert summary["rows"] == 2 and summary["conversations"] == 1
    other = tmp_path / "other.jsonl"
    code, _, err = run_import(
        capsys, *("--input", str(folder), "--output", str(other), "--split", "validation")
    )
    assert code == cli.EXIT_BAD_INPUT
    assert f"{folder}: --split validation: no such split (splits: train, test)" in err


def test_a_folder_changed_since_the_last_import_is_read_again(tmp_path: Path, capsys) -> None:
    import datasets

    folder = tmp_path / "qa"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n"
    )
    seen = []
    for questions in (["Allo?"], ["Salut?", "Bonjour?"]):
        datasets.Dataset.from_dict({"user": questions}).to_parquet(
            str(folder / "data" / "train-00000-of-00001.parquet")
        )
        output = tmp_path / f"rows{len(seen)}.jsonl"
        code, _, err = run_import(capsys, "--input", str(folder), "--output", str(output))
        assert code == 0, err
        seen.append([r.user for r in read_records(output)])
    assert seen == [["Allo?"], ["Salut?", "Bonjour?"]]


def test_derived_ids_are_stable_and_duplicates_are_caught(tmp_path: Path, capsys) -> None:
    source = jsonl(tmp_path / "a.jsonl", [{"user": "Allo!"}, {"user": "Salut!"}, {"user": "Allo!"}])
    code, _, err = run_import(capsys, "--input", str(source), "--output", str(tmp_path / "o.jsonl"))
    assert code == cli.EXIT_BAD_INPUT
    assert f"{source}:3: id: duplicate id 'row-" in err and f"first seen at {source}:1" in err
    ids = []
    for name in ("x.jsonl", "y.jsonl"):
        output = tmp_path / name
        code, summary, err = run_import(
            capsys, "--input", str(source), "--output", str(output), "--drop-duplicates"
        )
        assert code == 0, err
        assert summary["dropped_duplicates"] == 1
        ids.append([r.id for r in read_records(output)])
    assert ids[0] == ids[1] and len(set(ids[0])) == 2


def test_an_existing_output_is_not_replaced_without_overwrite(tmp_path: Path, capsys) -> None:
    source = jsonl(tmp_path / "a.jsonl", [{"user": "Allo!"}])
    output = jsonl(tmp_path / "o.jsonl", [{"user": "déjà là"}])
    code, _, err = run_import(capsys, "--input", str(source), "--output", str(output))
    assert code == cli.EXIT_BAD_INPUT and "--overwrite" in err
    code, _, err = run_import(
        capsys, "--input", str(source), "--output", str(output), "--overwrite"
    )
    assert code == 0 and read_records(output)[0].user == "Allo!"


@dataclass
class Bad:
    rows: list[Any]
    args: tuple[str, ...]
    error: str  # after "<path>:"


BAD = {
    "a tool turn in a chat": Bad(
        [{"messages": CHAT[1:3]}, {"messages": [CHAT[1], {"role": "tool", "content": "x"}]}],
        (),
        "2: messages[1].role: unsupported role 'tool'",
    ),
    "two user turns in a row": Bad(
        [{"messages": [CHAT[1], CHAT[3]]}],
        (),
        "1: messages[1].role: expected assistant: turns alternate",
    ),
    "a conversation of only a system turn": Bad(
        [{"messages": [CHAT[0]]}], (), "1: messages: no user turn"
    ),
    "a ShareGPT turn without its value": Bad(
        [{"conversations": [{"from": "human"}]}],
        (),
        "1: conversations[0].value: expected a string or a list of text parts",
    ),
    "an Alpaca row without instruction": Bad(
        [{"instruction": "Allo"}, {"input": "x", "output": "y"}],
        ("--format", "alpaca"),
        "2: instruction: missing required field",
    ),
    "a mapped column that is missing": Bad(
        [{"question": "Allo?"}, {"prompt": "x"}],
        ("--format", "rows", "--map", "user=question"),
        "2: question: missing required field",
    ),
    "a row whose format cannot be told": Bad(
        [{"prompt": "x"}], (), "1: (format): cannot tell the format from the fields prompt"
    ),
    "a line that is not JSON": Bad([{"user": "x"}, "{oops"], (), "2: (json): malformed JSON"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_line_and_field(tmp_path: Path, capsys, case: Bad) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in case.rows), "utf-8"
    )
    output = tmp_path / "out.jsonl"
    code, _, err = run_import(capsys, "--input", str(source), "--output", str(output), *case.args)
    assert code == cli.EXIT_BAD_INPUT
    assert f"distill import: error: {source}:{case.error}" in err, err
    assert not output.exists()


def test_bad_parquet_rows_are_named_by_row_number(tmp_path: Path, capsys) -> None:
    import datasets

    source = tmp_path / "qa.parquet"
    datasets.Dataset.from_dict({"question": ["Allo?", None, "Salut?"]}).to_parquet(str(source))
    code, _, err = run_import(
        capsys,
        *("--input", str(source), "--output", str(tmp_path / "o.jsonl")),
        *("--map", "user=question"),
    )
    assert code == cli.EXIT_BAD_INPUT
    assert f"{source}:row 1: question: missing required field" in err


def test_map_names_a_known_field() -> None:
    with pytest.raises(ValueError, match="unknown field 'usr'"):
        ImportArgs(input=Path("a.jsonl"), output=Path("b.jsonl"), map=["usr=question"])
    with pytest.raises(ValueError, match="expected FIELD=NAME"):
        ImportArgs(input=Path("a.jsonl"), output=Path("b.jsonl"), map=["user"])
