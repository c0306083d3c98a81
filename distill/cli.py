"""``distill``: the workstation's command line, one subcommand per stage.

    distill label --input dataset/quebecois_distill.jsonl --output runs/demo/labelled.jsonl
    distill card --input runs/demo/labelled.jsonl --output runs/demo/DATASET_CARD.md
    distill import --input chats.jsonl --output prompts.jsonl
    distill import-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output-dir dist/smollm2
    distill bench --only decode --threads 4
    distill llamacpp build

Bad input ends with one line ``path:line: field: problem`` and exit code 2; a stage that fails
while running (teacher unreachable, a tool that failed) exits 1. ``--debug`` shows tracebacks.
Each stage prints its summary as one JSON line on stdout; logs and progress go to stderr.
Under a launcher (``torchrun -m distill.cli train ...``) only rank 0 logs below warnings and
prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from distill import argspec, ops

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# The stages ops builds command lines for, and chat, which talks to a Pi rather than making
# files (so not a Pipeline form); llamacpp and teacher are the CLI's own, below.
STAGES: dict[str, tuple[str, str]] = {**ops.STAGES, "chat": ("distill.chat", "ChatArgs")}


def _args_class(stage: str) -> type:
    if stage in ops.STAGES:
        return ops.args_class(stage)
    import importlib

    module_name, class_name = STAGES[stage]
    return getattr(importlib.import_module(module_name), class_name)


def _parser() -> argparse.ArgumentParser:
    parser = argspec.ArgumentParser(
        prog="distill",
        description="Distil a teacher model into a small student for Raspberry Pis.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        try:
            cls = _args_class(stage)
        except ops.OpError:
            continue  # a stage whose module is not there yet
        # The stage's module (a package's __init__ for a stage split into steps) holds its doc;
        # for one described in ops (bench), its arguments class does.
        module_name = STAGES[stage][0]
        text = (
            cls.__doc__ if module_name == ops.__name__ else sys.modules[module_name].__doc__
        ) or ""
        doc = text.strip().splitlines()
        stage_parser = sub.add_parser(
            stage,
            help=doc[0] if doc else stage,
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        argspec.build_parser(cls, stage_parser)
        stage_parser.set_defaults(stage=stage)
    tools = sub.add_parser("llamacpp", help="find or build the pinned llama.cpp tools")
    tools.add_argument("action", choices=("build", "where"))
    tools.add_argument("--variant", default="native", choices=("native", "openblas"))
    tools.add_argument(
        "--board",
        choices=("pi4", "pi5"),
        help="cross-compile for this Raspberry Pi class (aarch64; the llama_cpp role's programs)",
    )
    tools.add_argument("--target", action="append", help="only these programs (repeatable)")
    tools.set_defaults(stage="llamacpp")
    teacher = sub.add_parser("teacher", help="prepare the embedded teacher (convert once, cache)")
    teacher.set_defaults(stage="teacher")
    return parser


def _run(namespace: argparse.Namespace) -> dict:
    if namespace.stage == "llamacpp":
        from distill import llamacpp

        built = False
        if namespace.action == "build":
            targets = namespace.target or (
                llamacpp.TARGETS if namespace.board is None else llamacpp.BOARD_TARGETS
            )
            built = llamacpp.find_tools(namespace.variant, targets, namespace.board) is None
            tools = llamacpp.build(namespace.variant, targets=targets, board=namespace.board)
        elif namespace.board:
            found = llamacpp.find_tools(
                namespace.variant, namespace.target or llamacpp.BOARD_TARGETS, namespace.board
            )
            if found is None:
                raise llamacpp.LlamaCppError(
                    f"llama.cpp ({namespace.variant}) is not cross-built for {namespace.board}: "
                    f"run `distill llamacpp build --board {namespace.board}`"
                )
            tools = found
        else:
            tools = llamacpp.require_tools(namespace.variant)
        return {"bin": str(tools.bin), "board": namespace.board, "built": built, **tools.version()}
    if namespace.stage == "teacher":
        from distill.models import resolve_model

        path, source = resolve_model(None)
        return {"path": str(path), **source}
    import importlib

    cls = _args_class(namespace.stage)
    args = argspec.parse_into(cls, namespace)
    if namespace.stage == "bench":  # described in ops, run by distill.bench
        return ops.run_bench(args)
    module = importlib.import_module(STAGES[namespace.stage][0])
    return module.run(args)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from distill.records import RecordError

    return (RecordError, ValueError, FileNotFoundError, IsADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distill``; returns the exit code."""
    parser = _parser()
    namespace = parser.parse_args(argv)
    # torchrun and accelerate launch set RANK; the other processes would repeat rank 0's lines.
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.DEBUG
        if namespace.debug
        else logging.WARNING
        if namespace.quiet or not main_rank
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    prog = f"distill {namespace.stage}"
    try:
        summary = _run(namespace)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _bad_input_errors() as err:
        if namespace.debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        if namespace.debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_FAILED
    if main_rank:
        print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
