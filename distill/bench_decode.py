"""Decode speed against the memory-bandwidth roofline, for each llama.cpp build variant.

A dense decoder reads every weight once per generated token, so generation cannot beat
``memory bandwidth / bytes of weights`` tokens/s (the roofline). This measures the workstation's
read bandwidth with the same number of threads, runs llama-bench (pp and tg) on the embedded
teacher GGUF with each build variant the llama_cpp role weighs (native and OpenBLAS), and says
which one the role keeps and why: the one that answers a typical request (``PROMPT`` tokens in,
``GEN`` out) soonest, since OpenBLAS only speeds up prompt processing, if at all.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distill.bench")

PROMPT = 256
GEN = 64
VARIANTS = ("native", "openblas")


def read_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Best read bandwidth in GB/s of ``threads`` threads each summing its own array."""
    import numpy as np

    arrays = [np.ones(mib * 1024 * 1024 // 8) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=a.sum) for a in arrays]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        best = max(best, threads * mib * 1024 * 1024 / elapsed / 1e9)
    return best


def llama_bench(bin_dir: Path, model: Path, threads: int, repetitions: int = 3) -> dict[str, float]:
    """``{"pp": tok/s, "tg": tok/s}`` from llama-bench's JSON (pp PROMPT, tg GEN)."""
    from distill.llamacpp import run

    done = run(
        [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(PROMPT), "-n", str(GEN),
         "-t", str(threads), "-r", str(repetitions), "-o", "json"],
    )  # fmt: skip
    results: list[dict[str, Any]] = json.loads(done.stdout)
    out = {}
    for entry in results:
        out["tg" if entry["n_gen"] > 0 else "pp"] = float(entry["avg_ts"])
    return out


def request_seconds(speeds: dict[str, float]) -> float:
    """Seconds to answer a PROMPT-token request with GEN tokens."""
    return PROMPT / speeds["pp"] + GEN / speeds["tg"]


def measure(threads: int = 2) -> dict[str, Any]:
    """Bandwidth, roofline and per-variant speeds; builds a variant that is missing (once)."""
    from distill import llamacpp
    from distill.models import embedded_teacher_gguf

    model = embedded_teacher_gguf()
    bandwidth = read_bandwidth(threads)
    weights = model.stat().st_size
    speeds = {}
    for variant in VARIANTS:
        tools = llamacpp.find_tools(variant) or llamacpp.build(variant)
        log.info("llama-bench, %s build, %d threads", variant, threads)
        speeds[variant] = llama_bench(tools.bin, model, threads)
    by_tg = max(speeds, key=lambda v: speeds[v]["tg"])
    by_request = min(speeds, key=lambda v: request_seconds(speeds[v]))
    return {
        "model": model.name,
        "weights_mb": weights / 1e6,
        "threads": threads,
        "bandwidth_gbs": bandwidth,
        "roofline_tg": bandwidth * 1e9 / weights,
        "speeds": speeds,
        "fastest_tg": by_tg,
        "kept": by_request,
    }
