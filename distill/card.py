"""Dataset cards: what is in a set of prompt rows, where it came from, and who labelled it.

    distill card --input dataset/quebecois_distill.jsonl dataset/quebecois_conversation.jsonl \\
        --output runs/demo/DATASET_CARD.md
    distill card --input runs/demo/labelled.jsonl --output runs/demo/LABELLED_CARD.md
    distill card --input runs/demo/labelled/*.jsonl --output runs/demo/LABELLED_CARD.md \\
        --dataset-dir runs/demo/hf-dataset     # + parquet shards and a README: a HF dataset

Writes a Markdown card with Hugging Face dataset-card front matter and, beside it, the same
statistics as JSON (``CARD.json``): counts per file and split, register and dialect
distributions, length statistics of prompts and answers, and the provenance aggregated (sources,
licenses, and for labelled rows the teacher models, revisions, backends and tool versions).
The rows are read with the same validation as every other stage. The front matter is built
with huggingface_hub's ``DatasetCardData``, so any ``--name`` gives valid YAML.

``--dataset-dir`` also writes the rows as a Hugging Face dataset folder: parquet shards
``data/<split>-<content hash>-NNNNN-of-NNNNN.parquet`` (a ``messages`` column ready for chat
fine-tuning, the row's fields beside it, ``json_schema`` and ``metadata`` as JSON text) and a
``README.md`` whose ``configs`` name the splits, so ``datasets.load_dataset(folder)`` reads it
back as it is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.argspec import arg
from distill.records import UNSPECIFIED, Record, atomic_write_json, atomic_write_text, read_many


@dataclass
class CardArgs:
    """Arguments of ``distill card``."""

    input: list[Path] = arg(help="one or more JSONL files (prompt rows or labelled rows)")
    output: Path = arg(help="Markdown card to write (the JSON statistics go beside it)")
    name: str = arg("pidistill-quebecois", help="dataset name in the card's front matter")
    license: str = arg("cc0-1.0", help="license id in the card's front matter")
    language: str = arg("fr", help="language code in the card's front matter")
    dataset_dir: Path | None = arg(
        None,
        help="also write the rows as a Hugging Face dataset folder (parquet shards + README.md)",
    )

    def __post_init__(self) -> None:
        self.input = [Path(p) for p in self.input]
        self.output = Path(self.output)
        if not self.input:
            raise ValueError("--input needs at least one file")
        if self.output.suffix.lower() != ".md":
            raise ValueError(f"--output must be a Markdown file (.md), got {self.output}")
        if any(self.output.resolve() == p.resolve() for p in self.input):
            raise ValueError("--output must not be one of the inputs")
        if self.dataset_dir is not None:
            self.dataset_dir = Path(self.dataset_dir)


def _lengths(texts: Sequence[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    if not words:
        return {}
    ordered = sorted(words)
    return {
        "count": len(words),
        "min_words": ordered[0],
        "median_words": statistics.median(ordered),
        "mean_words": round(statistics.fmean(ordered), 1),
        "p95_words": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max_words": ordered[-1],
        "mean_chars": round(statistics.fmean(len(t) for t in texts), 1),
    }


def _distribution(values: Sequence[str]) -> dict[str, dict[str, float]]:
    counts = Counter(values)
    total = sum(counts.values())
    return {
        key: {"count": n, "share": round(n / total, 4)}
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    }


def _provenance(record: Record) -> dict[str, Any]:
    return record.metadata.get("provenance") or {}


def _conversations(records: Sequence[Record]) -> dict[str, Any]:
    """Multi-turn rows: how many, their user turns, and how many the teacher answered."""
    multi = [r for r in records if r.history]
    return {
        "rows": len(multi),
        "labelled": sum(r.assistant is not None for r in multi),
        "turns": {str(n): count for n, count in sorted(Counter(r.turns for r in records).items())},
        "earlier_turns": _lengths([t["content"] for r in multi for t in r.history]),
    }


def statistics_of(records: Sequence[Record]) -> dict[str, Any]:
    """Every number on the card, as a JSON-ready dict."""
    labelled = [r for r in records if r.assistant is not None]
    labellers: Counter[str] = Counter()
    tools: Counter[str] = Counter()
    settings: Counter[str] = Counter()
    for record in labelled:
        who = _provenance(record).get("labeller") or {}
        labellers[
            f"{who.get('model', '?')} @ {who.get('revision') or '-'} ({who.get('backend', '?')},"
            f" {who.get('prompt_style', '?')})"
        ] += 1
        versions = ", ".join(
            f"{k} {who[k]}" for k in ("tool", "transformers", "torch") if who.get(k)
        )
        tools[versions or "unrecorded"] += 1
        settings[json.dumps(who.get("generation", {}), sort_keys=True)] += 1
    return {
        "rows": len(records),
        "files": dict(Counter(r.source for r in records)),
        "splits": _distribution([r.split for r in records]),
        "requires_json": sum(r.requires_json for r in records),
        "labelled": len(labelled),
        "with_logprobs": sum("teacher_logprobs" in r.extra for r in labelled),
        "trimmed": sum(
            "trimmed" in ((r.metadata.get("provenance") or {}).get("labeller") or {})
            for r in labelled
        ),
        "rejected": rejects_of(sorted({Path(r.source) for r in records})),
        "register": _distribution([r.meta("register") for r in records]),
        "dialect": _distribution([r.meta("dialect") for r in records]),
        "conversations": _conversations(records),
        "with_reference": sum(r.reference is not None for r in records),
        "ids_derived": sum(r.id_derived for r in records),
        "topic": _distribution([str(r.metadata.get("topic", "—")) for r in records]),
        "lengths": {
            "user": _lengths([r.user for r in records]),
            "system_hint": _lengths([r.system_hint for r in records if r.system_hint]),
            "assistant": _lengths([r.assistant for r in labelled if r.assistant]),
        },
        "provenance": {
            "source": dict(
                Counter(str(_provenance(r).get("source") or UNSPECIFIED) for r in records)
            ),
            "license": dict(
                Counter(str(_provenance(r).get("license") or UNSPECIFIED) for r in records)
            ),
            "labellers": dict(labellers),
            "tool_versions": dict(tools),
            "generation_settings": dict(settings),
        },
    }


def rejects_of(inputs: Sequence[Path]) -> dict[str, Any]:
    """What the labeller rejected beside each input (``X.rejects.jsonl``), counted by reason."""
    from distill.label.run import reason_kind
    from distill.records import iter_json_lines

    reasons: Counter[str] = Counter()
    for source in inputs:
        path = Path(source).with_name(Path(source).stem + ".rejects.jsonl")
        if path.exists():
            for _, row in iter_json_lines(path):
                reason = (row.get("reject") or {}).get("reason") if isinstance(row, dict) else None
                reasons[reason_kind(str(reason or "unrecorded"))] += 1
    return {"rows": sum(reasons.values()), "by_reason": dict(reasons.most_common())}


def _table(rows: dict[str, dict[str, float]], title: str) -> str:
    lines = [f"| {title} | rows | share |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['count']} | {v['share']:.1%} |" for k, v in rows.items()]
    return "\n".join(lines)


def _count_table(rows: dict[str, int], title: str) -> str:
    lines = [f"| {title} | rows |", "| --- | ---: |"]
    lines += [f"| {k} | {n} |" for k, n in rows.items()]
    return "\n".join(lines)


def _conversation_section(stats: dict[str, Any]) -> list[str]:
    """The multi-turn table, when some rows are conversations."""
    talk = stats["conversations"]
    if not talk["rows"]:
        return []
    total = sum(talk["turns"].values())
    turns = {k: {"count": n, "share": round(n / total, 4)} for k, n in talk["turns"].items()}
    earlier = talk["earlier_turns"]
    return [
        "## Conversations\n\n"
        f"{talk['rows']} rows carry earlier turns ({talk['labelled']} of them labelled). The "
        "teacher answers the last user turn; training learns that answer alone, the earlier "
        "turns (assistant ones included) are context with no loss. Earlier turns: median "
        f"{earlier.get('median_words')} words, max {earlier.get('max_words')}.\n\n"
        + _table(turns, "user turns")
    ]


def front_matter(
    stats: dict[str, Any], args: CardArgs, configs: list[dict[str, Any]] | None = None
) -> str:
    """The card's YAML header, built by ``DatasetCardData`` (quoting is its job, not ours)."""
    from huggingface_hub import DatasetCardData

    size = "n<1K" if stats["rows"] < 1000 else "1K<n<10K" if stats["rows"] < 10000 else "10K<n"
    data = DatasetCardData(
        pretty_name=args.name,
        license=args.license,
        language=[args.language],
        task_categories=["text-generation"],
        size_categories=[size],
        tags=["distillation", "pidistill"],
        **({"configs": configs} if configs else {}),
    )
    return "---\n" + data.to_yaml() + "\n---"


def render_card(
    stats: dict[str, Any], args: CardArgs, configs: list[dict[str, Any]] | None = None
) -> str:
    """The Markdown card: HF dataset-card front matter, then the tables."""
    front = front_matter(stats, args, configs)
    length_rows = [
        "| field | rows | min | median | mean | p95 | max (words) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, values in stats["lengths"].items():
        if values:
            length_rows.append(
                f"| {name} | {values['count']} | {values['min_words']} | "
                f"{values['median_words']} | {values['mean_words']} | {values['p95_words']} | "
                f"{values['max_words']} |"
            )
    provenance = stats["provenance"]
    parts = [
        front,
        f"# {args.name}",
        f"{stats['rows']} rows from {len(stats['files'])} file(s); "
        f"{stats['requires_json']} ask for JSON; {stats['labelled']} labelled by a teacher"
        f" ({stats['with_logprobs']} with its top-K log-probabilities, {stats['trimmed']} cut "
        "back to their last finished sentence); "
        f"{stats['rejected']['rows']} rejected by the labeller; "
        f"{stats['conversations']['rows']} are conversations of several turns; "
        f"{stats['with_reference']} carry a reference answer from their source; "
        f"{stats['ids_derived']} have an id derived from their content. Rows that name no "
        f"register, dialect, source or license count as `{UNSPECIFIED}`.",
        "## Files\n\n" + _count_table(stats["files"], "file"),
        "## Splits\n\n" + _table(stats["splits"], "split"),
        "## Register\n\n" + _table(stats["register"], "register"),
        "## Dialect\n\n" + _table(stats["dialect"], "dialect"),
        "## Lengths\n\n" + "\n".join(length_rows),
        *_conversation_section(stats),
        "## Provenance\n\n"
        + _count_table(provenance["source"], "source")
        + "\n\n"
        + _count_table(provenance["license"], "license"),
    ]
    if provenance["labellers"]:
        parts.append(
            "## Labelling\n\n"
            + _count_table(provenance["labellers"], "teacher")
            + "\n\n"
            + _count_table(provenance["tool_versions"], "tools")
            + "\n\n"
            + _count_table(
                {f"`{k}`": v for k, v in provenance["generation_settings"].items()},
                "generation settings",
            )
        )
    if stats["rejected"]["rows"]:
        parts.append(
            "## Rejected by the labeller\n\n"
            "Answers that failed the schema or the quality gate; each row and its reason is in "
            "the `.rejects.jsonl` beside its file.\n\n"
            + _count_table(stats["rejected"]["by_reason"], "reason")
        )
    return "\n\n".join(parts) + "\n"


SHARD_ROWS = 10_000  # rows per parquet shard of a dataset folder
MARKER = "pidistill_card.json"  # a dataset folder written by distill card (safe to replace)


def dataset_row(record: Record) -> dict[str, Any]:
    """One row of the dataset folder: the chat as ``messages``, the row's fields beside it."""
    from distill.records import build_messages

    messages = build_messages(record)
    if record.assistant is not None:
        messages.append({"role": "assistant", "content": record.assistant})
    return {
        "id": record.id,
        "messages": messages,
        "system_hint": record.system_hint,
        "history": [dict(turn) for turn in record.history],
        "user": record.user,
        "requires_json": record.requires_json,
        "json_schema": None
        if record.json_schema is None
        else json.dumps(record.json_schema, ensure_ascii=False, sort_keys=True),
        "assistant": record.assistant,
        "reference": record.reference,
        "register": record.meta("register"),
        "dialect": record.meta("dialect"),
        "metadata": json.dumps(record.metadata, ensure_ascii=False, sort_keys=True),
    }


def _features() -> Any:
    from datasets import Features, Value

    turn = [{"role": Value("string"), "content": Value("string")}]
    return Features(
        {
            "id": Value("string"),
            "messages": turn,
            "system_hint": Value("string"),
            "history": turn,
            "user": Value("string"),
            "requires_json": Value("bool"),
            "json_schema": Value("string"),
            "assistant": Value("string"),
            "reference": Value("string"),
            "register": Value("string"),
            "dialect": Value("string"),
            "metadata": Value("string"),
        }
    )


def write_dataset(
    records: list[Record], stats: dict[str, Any], args: CardArgs, folder: Path
) -> dict[str, Any]:
    """The rows as a Hugging Face dataset folder; return its splits and files.

    Written in a temporary sibling and moved in place: a folder a previous ``distill card``
    wrote is replaced, any other existing folder is refused.
    """
    from datasets import Dataset

    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise ValueError(f"{folder}: exists and was not written by distill card; pick another")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files: dict[str, list[str]] = {}
        splits = {
            s: [dataset_row(r) for r in records if r.split == s] for s in ("train", "heldout")
        }
        # datasets caches a folder by its README's file patterns, not by the files' content: a
        # content hash in the names keeps it from serving an earlier folder's rows.
        digest = hashlib.sha256(
            json.dumps(splits, ensure_ascii=False, sort_keys=True).encode("utf-8")
        ).hexdigest()[:12]
        for split, rows in splits.items():
            if not rows:
                continue
            shards = -(-len(rows) // SHARD_ROWS)
            for index in range(shards):
                name = f"data/{split}-{digest}-{index:05d}-of-{shards:05d}.parquet"
                (tmp / "data").mkdir(exist_ok=True)
                part = rows[index * SHARD_ROWS : (index + 1) * SHARD_ROWS]
                Dataset.from_list(part, features=_features()).to_parquet(str(tmp / name))
                files.setdefault(split, []).append(name)
        configs = [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-{digest}-*"} for s in files],
            }
        ]
        (tmp / "README.md").write_text(render_card(stats, args, configs), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": str(folder), "splits": {s: len(f) for s, f in files.items()}}


def run(args: CardArgs) -> dict[str, Any]:
    """The ``distill card`` stage: validate every row, then write the card and its JSON."""
    records = read_many(args.input)
    stats = statistics_of(records)
    json_path = args.output.with_suffix(".json")
    atomic_write_json(json_path, stats)
    atomic_write_text(args.output, render_card(stats, args))
    summary: dict[str, Any] = {
        "rows": stats["rows"],
        "card": str(args.output),
        "json": str(json_path),
    }
    if args.dataset_dir is not None:
        summary["dataset"] = write_dataset(records, stats, args, args.dataset_dir)
    return summary
