"""Dataset cards: distributions, lengths and provenance of the rows, Markdown plus JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distill import card
from distill.card import CardArgs
from distill.records import read_many


def test_card_of_the_sample_data(tmp_path: Path, sample_files) -> None:
    output = tmp_path / "CARD.md"
    result = card.run(CardArgs(input=list(sample_files), output=output))
    rows = read_many(sample_files)
    stats = json.loads(output.with_suffix(".json").read_text())
    assert result["rows"] == stats["rows"] == len(rows)
    assert sum(v["count"] for v in stats["register"].values()) == len(rows)
    assert stats["requires_json"] == sum(r.requires_json for r in rows)
    assert stats["splits"]["heldout"]["count"] == sum(r.split == "heldout" for r in rows)
    assert stats["labelled"] == 0
    text = output.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "cc0-1.0" and front["language"] == ["fr"]
    assert "## Register" in text and "| familier |" in text
    assert "## Labelling" not in text


def test_card_aggregates_labeller_provenance(tmp_path: Path) -> None:
    labelled = tmp_path / "labelled.jsonl"
    rows = []
    for i, model in enumerate(["teacher-a", "teacher-a", "teacher-b"]):
        rows.append(
            {
                "id": f"x{i}",
                "system_hint": "",
                "user": "un deux trois",
                "requires_json": False,
                "json_schema": None,
                "assistant": "quatre cinq",
                "metadata": {
                    "register": "neutre",
                    "dialect": "acadien",
                    "provenance": {
                        "source": "s",
                        "license": "CC0-1.0",
                        "labeller": {
                            "model": model,
                            "revision": "r1",
                            "backend": "transformers",
                            "prompt_style": "chat",
                            "tool": "pidistill 0.1.0",
                            "transformers": "5.0",
                            "generation": {"max_new_tokens": 8},
                            **({"trimmed": {"from_tokens": 8, "to": 3}} if i == 2 else {}),
                        },
                    },
                },
            }
        )
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card.run(CardArgs(input=[labelled], output=tmp_path / "c.md"))
    stats = json.loads((tmp_path / "c.json").read_text())
    assert stats["labelled"] == 3
    assert stats["trimmed"] == 1
    assert "1 cut back to their last finished sentence" in (tmp_path / "c.md").read_text()
    assert stats["provenance"]["labellers"] == {
        "teacher-a @ r1 (transformers, chat)": 2,
        "teacher-b @ r1 (transformers, chat)": 1,
    }
    assert stats["provenance"]["tool_versions"] == {"tool pidistill 0.1.0, transformers 5.0": 3}
    assert stats["lengths"]["assistant"]["mean_words"] == 2
    assert "## Labelling" in (tmp_path / "c.md").read_text()


def test_the_card_counts_what_the_labeller_rejected_and_why(tmp_path) -> None:
    import json as _json

    from distill.card import CardArgs, run

    rows = tmp_path / "l.jsonl"
    meta = {"register": "familier", "dialect": "québécois", "provenance": {"source": "t"}}
    base = {"system_hint": "", "user": "Salut", "requires_json": False, "json_schema": None}
    rows.write_text(_json.dumps({"id": "a", **base, "metadata": meta, "assistant": "Allô."}) + "\n")
    rejects = tmp_path / "l.rejects.jsonl"
    reasons = ["repetition: 45% of ...", "truncated: cut", "repetition: 60% of ..."]
    rejects.write_text(
        "".join(
            _json.dumps({"id": f"r{i}", **base, "metadata": meta, "reject": {"reason": r}}) + "\n"
            for i, r in enumerate(reasons)
        )
    )
    out = tmp_path / "CARD.md"
    run(CardArgs(input=[rows], output=out))
    stats = _json.loads(out.with_suffix(".json").read_text())
    assert stats["rejected"] == {"rows": 3, "by_reason": {"repetition": 2, "truncated": 1}}
    assert "| repetition | 2 |" in out.read_text()


def test_a_file_of_user_rows_gets_a_card_with_unspecified_metadata(tmp_path: Path) -> None:
    source = tmp_path / "mine.jsonl"
    source.write_text(
        '{"user": "Y fait-tu frette?"}\n'
        '{"user": "Pis demain?", "metadata": {"register": "familier"}}\n',
        encoding="utf-8",
    )
    output = tmp_path / "CARD.md"
    card.run(CardArgs(input=[source], output=output))
    stats = json.loads(output.with_suffix(".json").read_text())
    assert stats["register"] == {
        "familier": {"count": 1, "share": 0.5},
        "unspecified": {"count": 1, "share": 0.5},
    }
    assert stats["dialect"] == {"unspecified": {"count": 2, "share": 1.0}}
    assert stats["provenance"]["source"] == {"unspecified": 2}
    assert stats["ids_derived"] == 2
    assert "| unspecified | 2 | 100.0% |" in output.read_text()


def test_the_card_shows_conversations_and_their_turns(tmp_path: Path) -> None:
    history = [
        {"role": "user", "content": "Allo!"},
        {"role": "assistant", "content": "Salut, ça va?"},
    ]
    rows = [
        {"id": "a", "user": "Une question."},
        {"id": "b", "history": history, "user": "Pis toi?", "assistant": "Ben correct."},
        {"id": "c", "history": history * 2, "user": "Encore?", "reference": "Oui."},
    ]
    source = tmp_path / "talk.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output = tmp_path / "CARD.md"
    card.run(CardArgs(input=[source], output=output))
    stats = json.loads(output.with_suffix(".json").read_text())
    assert stats["conversations"]["rows"] == 2
    assert stats["conversations"]["labelled"] == 1
    assert stats["conversations"]["turns"] == {"1": 1, "2": 1, "3": 1}
    assert stats["with_reference"] == 1
    text = output.read_text()
    assert "## Conversations" in text
    assert "2 rows carry earlier turns (1 of them labelled)" in text
    assert "| 3 | 1 | 33.3% |" in text


def front_of(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---", 1)[0].removeprefix("---\n"))


def test_any_name_gives_a_parseable_yaml_header(tmp_path: Path) -> None:
    source = tmp_path / "mine.jsonl"
    source.write_text('{"user": "Allo!"}\n', encoding="utf-8")
    output = tmp_path / "CARD.md"
    name = "pidistill: québécois #1 - {x: [y]}"
    card.run(CardArgs(input=[source], output=output, name=name, license="cc-by-4.0"))
    front = front_of(output.read_text(encoding="utf-8"))
    assert front["pretty_name"] == name
    assert front["license"] == "cc-by-4.0" and front["size_categories"] == ["n<1K"]


def test_the_dataset_folder_loads_back_with_datasets(tmp_path: Path) -> None:
    import datasets

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    history = [
        {"role": "user", "content": "Allo!"},
        {"role": "assistant", "content": "Salut, ça va?"},
    ]
    rows = [
        {"id": "a", "system_hint": "Sois bref.", "user": "Une question.", "assistant": "Oui."},
        {"id": "b", "history": history, "user": "Pis toi?", "assistant": "Ben correct."},
        {"id": "c", "user": "JSON?", "requires_json": True, "json_schema": schema,
         "assistant": '{"ok": true}', "split": "heldout", "reference": "{}",
         "metadata": {"register": "neutre"}},
    ]  # fmt: skip
    source = tmp_path / "labelled.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    folder = tmp_path / "hf"
    args = CardArgs(input=[source], output=tmp_path / "CARD.md", dataset_dir=folder)
    summary = card.run(args)
    assert summary["dataset"]["splits"] == {"train": 1, "heldout": 1}
    names = sorted(p.name for p in (folder / "data").iterdir())
    assert [n.split("-")[0] for n in names] == ["heldout", "train"]
    assert all(n.endswith("-00000-of-00001.parquet") for n in names)
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "heldout"}
    assert loaded["train"]["id"] == ["a", "b"] and loaded["heldout"]["id"] == ["c"]
    talk = loaded["train"][1]
    assert talk["messages"] == [*history, {"role": "user", "content": "Pis toi?"},
                                {"role": "assistant", "content": "Ben correct."}]  # fmt: skip
    assert loaded["train"][0]["messages"][0] == {"role": "system", "content": "Sois bref."}
    held = loaded["heldout"][0]
    assert json.loads(held["json_schema"]) == schema and held["reference"] == "{}"
    assert (held["register"], held["dialect"]) == ("neutre", "unspecified")
    front = front_of((folder / "README.md").read_text(encoding="utf-8"))
    digest = names[0].split("-")[1]
    assert front["configs"][0]["data_files"] == [
        {"split": "train", "path": f"data/train-{digest}-*"},
        {"split": "heldout", "path": f"data/heldout-{digest}-*"},
    ]
    # A second run replaces its own folder, and datasets reads the new rows, not its cache.
    rows[0]["id"] = "a2"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    card.run(args)
    assert datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))["train"]["id"] == [
        "a2",
        "b",
    ]
    # A folder it did not write is left alone.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by distill card"):
        card.run(CardArgs(input=[source], output=tmp_path / "C2.md", dataset_dir=other))
    assert (other / "keep.txt").exists()
