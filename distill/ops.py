"""Builders of every stage's exact command line, shared by the Makefile, the demo and the TUI.

    >>> from distill.ops import build
    >>> build("label", input="dataset/quebecois_distill.jsonl", output="out.jsonl",
    ...       batch_size=32).argv  # doctest: +NORMALIZE_WHITESPACE
    ['distill', 'label', '--input', 'dataset/quebecois_distill.jsonl', '--output', 'out.jsonl',
     '--batch-size', '32']

    >>> build("bench", only=["decode"], threads=4).shell()
    'distill bench --only decode --threads 4'

Each stage's arguments are one dataclass (``distill.label.LabelArgs``...); building it runs
its checks, so a non-positive batch size or a missing required field fails here, before any
process starts. Secrets (hub token, API key) travel in the environment, never on the command
line. The benchmarks (``make bench``, ``distill bench``) are described here, by
:class:`BenchArgs`, so the Makefile and the TUI's Pipeline screen build the same command.
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import argspec
from distill.argspec import arg

# stage name -> (module, arguments class); modules load lazily so `distill --help` stays instant.
STAGES: dict[str, tuple[str, str]] = {
    "label": ("distill.label", "LabelArgs"),
    "card": ("distill.card", "CardArgs"),
    "train": ("distill.train", "TrainArgs"),
    "export": ("distill.export", "ExportArgs"),
    "eval": ("distill.evaluate", "EvalArgs"),
    "import": ("distill.importers", "ImportArgs"),
    "import-gguf": ("distill.import_gguf", "ImportGgufArgs"),
    "bench": ("distill.ops", "BenchArgs"),
}
# distill.bench's sections (a test keeps the two lists equal; importing it here would load more
# than `distill --help` needs).
BENCH_SECTIONS = (
    "agent", "decode", "distillation", "fleet", "labelling", "labelling-size", "training",
)  # fmt: skip


@dataclass
class BenchArgs:
    """``distill bench``: speed and memory of each stage, the benchmarks of ``make bench``.

        distill bench --out runs/bench
        distill bench --only labelling decode --rows 32 --threads 4

    Runs ``python -m distill.bench`` (see its docstring for the sections) with these flags;
    ``bench.md`` and ``bench.csv`` land in ``--out``, the Markdown report goes to stderr and a
    JSON summary to stdout, as every stage's. Described here so the Makefile and the TUI's
    Pipeline screen build the same command.
    """

    out: Path = arg(Path("runs/bench"), help="output directory (bench.md, bench.csv)")
    only: list[str] | None = arg(
        None, help="sections to run (default: every one)", choices=BENCH_SECTIONS
    )
    rows: int = arg(64, help="prompts per labelling backend")
    loop_rows: int = arg(12, help="prompts for the slow per-row loop (labelling)")
    max_new_tokens: int = arg(32, help="tokens per answer (labelling)")
    batch_size: int = arg(32, help="transformers batch size (labelling)")
    parallel: int = arg(16, help="llama-server slots (labelling)")
    threads: int = arg(2, help="llama-bench threads (decode)")
    distill_steps: int = arg(16, help="optimizer steps per loss (distillation)")
    size_rows: int = arg(
        100_000, help="rows of the large labelling-size run (the small one: a tenth)"
    )
    size_tokens: int = arg(4, help="tokens per answer (labelling-size)")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("rows", "loop_rows", "max_new_tokens", "batch_size", "parallel", "threads",
                     "distill_steps", "size_rows", "size_tokens"):  # fmt: skip
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be positive, got {getattr(self, name)}")
        unknown = sorted(set(self.only or []) - set(BENCH_SECTIONS))
        if unknown:
            known = ", ".join(BENCH_SECTIONS)
            raise ValueError(f"only: unknown section(s) {', '.join(unknown)} (known: {known})")


def run_bench(args: BenchArgs) -> dict[str, Any]:
    """Run ``distill.bench`` with ``args``; its Markdown report goes to stderr, the summary back."""
    import contextlib
    import sys

    from distill import bench

    argv, _ = argspec.to_argv(args)
    if "--out" not in argv:  # the default, written out: distill.bench need not share it
        argv += ["--out", str(args.out)]
    with contextlib.redirect_stdout(sys.stderr):
        code = bench.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m distill.bench {shlex.join(argv)}: exit {code}")
    return {
        "out": str(args.out),
        "sections": args.only or sorted(bench.SECTIONS),
        "markdown": str(args.out / "bench.md"),
        "csv": str(args.out / "bench.csv"),
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
