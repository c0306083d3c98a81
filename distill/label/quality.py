"""The quality gate: degenerate teacher answers go to the rejects file with a reason.

An answer is rejected when it is empty; when a ``requires_json`` answer does not parse or does
not validate against its schema; when a short unit repeats itself (``1111...``, ``ha ha ha``)
ten times in a row; when more than ``max_repeat_ratio`` of its word 4-grams are repeats of
earlier ones (the teacher looping on a sentence); when generation stopped at
``--max-new-tokens`` in the middle of a sentence (unless ``--trim-truncated`` could cut it back
to its last finished sentence: :func:`sentence_prefix`); and, with ``--language``, when its
stop words read as another language. Each reason is one line, kept in the reject row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distill.records import Record, check_json_answer

# A unit of 1 to 12 characters repeated 10 times or more in a row (digits looping in a string).
_LOOP = re.compile(r"(.{1,12}?)\1{9,}", re.DOTALL)
_WORD = re.compile(r"\w+", re.UNICODE)
# What a finished sentence (or a finished list item, quote or code block) ends with.
_ENDINGS = tuple(".!?…»\"')]}*`:;")
NGRAM = 4
# Where a trimmed answer may end: a sentence's own punctuation, then closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…][\"'»”’)\]]*$")
# Short, frequent function words: enough to tell French from English on a paragraph.
STOP_WORDS = {
    "fr": frozenset(
        [
            "le",
            "la",
            "les",
            "de",
            "des",
            "du",
            "un",
            "une",
            "et",
            "est",
            "que",
            "qui",
            "pas",
            "pour",
            "dans",
            "sur",
            "avec",
            "ce",
            "ça",
            "je",
            "tu",
            "il",
            "elle",
            "on",
            "nous",
            "vous",
            "ils",
            "sont",
            "mais",
            "ou",
            "pis",
            "au",
            "aux",
            "en",
            "ne",
            "se",
            "sa",
            "son",
            "ses",
            "mon",
            "ma",
            "mes",
            "ton",
            "ta",
            "tes",
            "y",
            "c'est",
            "c’est",
        ]
    ),
    "en": frozenset(
        [
            "the",
            "and",
            "is",
            "of",
            "to",
            "in",
            "that",
            "it",
            "you",
            "for",
            "with",
            "on",
            "are",
            "this",
            "be",
            "have",
            "not",
            "was",
            "what",
            "your",
            "from",
            "they",
            "will",
            "can",
            "there",
            "an",
            "or",
            "by",
            "at",
            "as",
            "do",
            "if",
        ]
    ),
}


@dataclass(frozen=True)
class Gate:
    """The thresholds of the gate (``distill label`` flags); ``enabled=False`` keeps only the
    empty and JSON checks."""

    enabled: bool = True
    max_repeat_ratio: float = 0.3
    reject_truncated: bool = True
    language: str = "none"


def repeat_ratio(text: str, n: int = NGRAM) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (0 for short texts)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2 * n:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def guess_language(text: str) -> str | None:
    """``fr`` or ``en`` by stop-word counts; None when too few stop words to tell."""
    words = [w.lower() for w in re.findall(r"[\w'’]+", text)]
    counts = {lang: sum(w in stop for w in words) for lang, stop in STOP_WORDS.items()}
    best = max(counts, key=counts.__getitem__)
    if counts[best] < 3 or list(counts.values()).count(counts[best]) > 1:
        return None
    return best


def sentence_prefix(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> int | None:
    """The most tokens of ``ids`` whose text ends a sentence (``... pis c'est tout.``), or None.

    For an answer cut by ``--max-new-tokens``: keeping its finished sentences makes a shorter
    answer that ends where the teacher ended a thought, and whose token ids (and probabilities)
    are a prefix of the generated ones. ``decode`` turns ids into text (special tokens skipped).
    """
    for n in range(len(ids) - 1, 0, -1):
        if _SENTENCE_END.search(decode(ids[:n]).rstrip()):
            return n
    return None


def problem(record: Record, text: str, finished: bool | None, gate: Gate) -> str | None:
    """Why this answer must not be trained on, or None when it passes.

    ``finished`` is whether the teacher ended the answer itself (None when unknown).
    """
    text = text.strip()
    if not text:
        return "empty answer"
    if record.requires_json and record.json_schema is not None:
        invalid = check_json_answer(text, record.json_schema)
        if invalid:
            return invalid
    if not gate.enabled:
        return None
    loop = _LOOP.search(text)
    if loop:
        unit = loop.group(1)
        times = len(loop.group(0)) // len(unit)
        return f"loops: {unit!r} repeated {times} times in a row"
    ratio = repeat_ratio(text)
    if gate.max_repeat_ratio and ratio > gate.max_repeat_ratio:
        return (
            f"repetition: {ratio:.0%} of its word {NGRAM}-grams repeat "
            f"(over --max-repeat-ratio {gate.max_repeat_ratio:.0%})"
        )
    if (
        gate.reject_truncated
        and finished is False
        and not record.requires_json
        and not text.endswith(_ENDINGS)
    ):
        return "truncated: cut by --max-new-tokens in the middle of a sentence"
    if gate.language != "none" and not record.requires_json:
        seen = guess_language(text)
        if seen is not None and seen != gate.language:
            return f"language: reads as {seen}, expected {gate.language}"
    return None
