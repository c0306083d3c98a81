#!/usr/bin/env python3
"""Pick the llama.cpp build variant to keep from llama-bench's JSON outputs (one per variant).

    pick_variant.py --metric request --prompt 256 --gen 64 native=native.json openblas=o.json
    echo '{"native": "<llama-bench JSON>", ...}' | pick_variant.py      # the role's way

Prints one JSON object: ``variant`` (the winner), ``reason``, and ``bench`` (per variant: pp and
tg tokens/s, and the score compared). Metrics: ``tg`` (generated tokens/s), ``pp`` (prompt
tokens/s), or ``request`` (the default: tokens/s of a whole request, ``prompt`` tokens in and
``gen`` out, i.e. (prompt + gen) / (prompt / pp + gen / tg)). OpenBLAS only speeds up prompt
processing, if at all, and can slow it down on small boards: ``request`` weighs both phases as a
chat request does. A variant without a usable result is left out; none at all exits 1.
Standard library only: it runs with the Python that runs ansible-playbook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def speeds(results: list[dict[str, Any]]) -> dict[str, float]:
    """``{"pp": tok/s, "tg": tok/s}`` from llama-bench ``-o json`` entries (either may lack)."""
    out: dict[str, float] = {}
    for entry in results:
        key = "tg" if int(entry.get("n_gen", 0)) > 0 else "pp"
        out[key] = float(entry["avg_ts"])
    return out


def score(measured: dict[str, float], metric: str, prompt: int, gen: int) -> float | None:
    """Higher is better; ``None`` when the metric's inputs are missing."""
    if metric in ("tg", "pp"):
        return measured.get(metric)
    if not measured.get("pp") or not measured.get("tg"):
        return None
    return (prompt + gen) / (prompt / measured["pp"] + gen / measured["tg"])


def pick(outputs: dict[str, str], metric: str, prompt: int, gen: int) -> dict[str, Any]:
    """The decision, from each variant's llama-bench JSON text."""
    bench: dict[str, dict[str, float]] = {}
    for variant, text in outputs.items():
        try:
            measured = speeds(json.loads(text))
        except (ValueError, KeyError, TypeError):
            continue
        value = score(measured, metric, prompt, gen)
        if value is not None:
            bench[variant] = {**measured, "score": round(value, 2)}
    if not bench:
        raise ValueError("no variant has a usable llama-bench result")
    winner = max(bench, key=lambda v: bench[v]["score"])
    what = {
        "tg": "generated tokens/s",
        "pp": "prompt tokens/s",
        "request": f"tokens/s of a request of {prompt} prompt tokens and {gen} generated",
    }[metric]
    reason = f"fastest by llama-bench {what}"
    others = [v for v in bench if v != winner]
    if others and metric == "request":
        best_tg = max(bench, key=lambda v: bench[v].get("tg", 0.0))
        if best_tg != winner:
            reason += f" ({best_tg} generates faster, but loses more in prompt processing)"
    return {"variant": winner, "reason": reason, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", choices=["request", "tg", "pp"], default="request")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of a request")
    parser.add_argument("--gen", type=int, default=64, help="generated tokens of a request")
    parser.add_argument("results", nargs="*",
                        help="variant=path of its llama-bench JSON (none: a JSON object on stdin, "
                             "variant -> llama-bench's output)")  # fmt: skip
    args = parser.parse_args(argv)
    outputs: dict[str, str] = {}
    if not args.results:
        try:
            outputs = {str(k): str(v) for k, v in json.load(sys.stdin).items()}
        except (ValueError, AttributeError) as exc:
            sys.stderr.write(
                f"pick_variant: stdin: expected a JSON object variant -> output ({exc})\n"
            )
            return 2
    for spec in args.results:
        variant, sep, path = spec.partition("=")
        if not sep or not variant:
            parser.error(f"{spec!r}: expected variant=path")
        outputs[variant] = Path(path).read_text(encoding="utf-8")
    try:
        decision = pick(outputs, args.metric, args.prompt, args.gen)
    except ValueError as exc:
        sys.stderr.write(f"pick_variant: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(decision) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
