"""The quality gate on teacher answers: each degenerate kind rejected with its reason."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from distill.label.quality import Gate, guess_language, problem, repeat_ratio
from distill.records import record_from_dict

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def row(requires_json: bool = False):
    return record_from_dict(
        {
            "id": "q1",
            "system_hint": "",
            "user": "Salut",
            "requires_json": requires_json,
            "json_schema": SCHEMA if requires_json else None,
            "metadata": {"register": "familier", "dialect": "québécois", "provenance": {}},
        }
    )


@dataclass(frozen=True)
class Case:
    text: str
    finished: bool | None
    expected: str | None
    requires_json: bool = False
    gate: Gate | None = None  # None: the defaults, with --language fr


CASES = {
    "a plain finished answer passes": Case(
        "Oui, c'est une bonne idée de mettre des pneus d'hiver avant le 1er décembre.", True, None
    ),
    "an empty answer": Case("   ", True, "empty answer"),
    "a looping sentence": Case(
        "Je suis le monde de la France, " * 5 + "voilà.", True, "repetition: "
    ),
    "digits looping in a unit": Case("Il est 15" + "0" * 30, True, "loops: '0' repeated"),
    "cut mid-sentence by the token budget": Case(
        "Pour poser tes pneus, il faut d'abord", False, "truncated: "
    ),
    "a cut answer that ended its sentence passes": Case("C'est fini.", False, None),
    "English where French was expected": Case(
        "You should put the winter tires on your car before the first of December.",
        True,
        "language: reads as en, expected fr",
    ),
    "invalid JSON": Case('{"n": "deux"}', True, "", requires_json=True),
    "valid JSON passes": Case('{"n": 2}', True, None, requires_json=True),
    "the gate off keeps a loop": Case("ha " * 20, True, None, gate=Gate(enabled=False)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_the_gate(case: Case) -> None:
    gate = case.gate or Gate(language="fr")
    got = problem(row(case.requires_json), case.text, case.finished, gate)
    if case.expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(case.expected)


def test_repeat_ratio_and_language_guess() -> None:
    assert repeat_ratio("un deux trois quatre cinq six sept huit neuf dix onze douze") == 0
    assert repeat_ratio("a b c d " * 6) > 0.7
    assert guess_language("Je pense que c'est pas une bonne idée pour le char.") == "fr"
    assert guess_language("ok") is None


def test_sentence_prefix_keeps_the_finished_sentences_of_a_real_tokenizer(tiny_model) -> None:
    from transformers import AutoTokenizer

    from distill.label.quality import sentence_prefix

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    ids = tokenizer.encode("Allô! C'est « parfait ». Pis là, on", add_special_tokens=False)
    n = sentence_prefix(decode, ids)
    assert n is not None and n < len(ids)
    assert decode(ids[:n]).strip() == "Allô! C'est « parfait »."
    assert (
        sentence_prefix(decode, tokenizer.encode("pas de fin ici", add_special_tokens=False))
        is None
    )
