"""Builders of every stage's exact command line, shared by the Makefile, the demo and the TUI.

    >>> from distill.ops import build
    >>> build("label", input="dataset/quebecois_distill.jsonl", output="out.jsonl",
    ...       batch_size=32).argv
    ['distill', 'label', '--input', 'dataset/quebecois_distill.jsonl', '--output', 'out.jsonl',
     '--batch-size', '32']

Each stage's arguments are one dataclass (``distill.label.LabelArgs``...); building it runs
its checks, so a non-positive batch size or a missing required field fails here, before any
process starts. Secrets (hub token, API key) travel in the environment, never on the command
line.
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from dataclasses import dataclass, field
from typing import Any

from distill import argspec

# stage name -> (module, arguments class); modules load lazily so `distill --help` stays instant.
STAGES: dict[str, tuple[str, str]] = {
    "label": ("distill.label", "LabelArgs"),
    "card": ("distill.card", "CardArgs"),
    "train": ("distill.train", "TrainArgs"),
    "export": ("distill.export", "ExportArgs"),
    "eval": ("distill.evaluate", "EvalArgs"),
    "import": ("distill.importers", "ImportArgs"),
    "import-gguf": ("distill.import_gguf", "ImportGgufArgs"),
}


class OpError(ValueError):
    """A stage command that cannot be built; the message names the stage and the field."""


@dataclass(frozen=True)
class Command:
    """A ready-to-run command line and the environment it needs."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one shell-quoted line (secrets are not in it)."""
        return shlex.join(self.argv)


def args_class(stage: str) -> type:
    """The arguments dataclass of a stage (its fields describe every flag)."""
    try:
        module_name, class_name = STAGES[stage]
    except KeyError:
        raise OpError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise OpError(f"stage {stage!r} is not available: {err}") from None
    return getattr(module, class_name)


def fields(stage: str) -> list[dict[str, Any]]:
    """Each flag of a stage: name, flag, help, default, required, choices (for forms)."""
    cls = args_class(stage)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(
            {
                "name": f.name,
                "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                "help": f.metadata["help"],
                "required": required,
                "default": None if required or f.default is dataclasses.MISSING else f.default,
                "choices": f.metadata.get("choices"),
                "secret": bool(f.metadata.get("secret")),
                "type": str(f.type),
            }
        )
    return out


def build(stage: str, program: str = "distill", **values: Any) -> Command:
    """Validate ``values`` as the stage's arguments and return its command line."""
    cls = args_class(stage)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OpError(f"{stage}: unknown option(s): {', '.join(unknown)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and values.get(f.name) in (None, "", [])
    ]
    if missing:
        raise OpError(f"{stage}: missing required field(s): {', '.join(missing)}")
    try:
        args = cls(**values)
    except (TypeError, ValueError) as err:
        raise OpError(f"{stage}: {err}") from None
    argv, env = argspec.to_argv(args)
    return Command([program, stage, *argv], env)
