"""Benchmarks: llama-bench to CSV with host metadata, then the throughput gate.

    pi-agent bench --config /etc/pi-agent/agent.toml            # the active model
    pi-agent bench --model x.gguf --threads 1,4 --tolerance 0.2 # exits 1 when the gate fails

Every row of llama-bench's CSV (``-o csv``) gains the host's metadata: host, board, model sha256,
quant, llama.cpp build, temperature before and after, throttled flags before and after. The CSV
lands in ``<state_dir>/bench/`` (the fleet fetches it), the summary in ``bench/last.json`` (the
bench collector reads it).
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pi_agent.fsutil import atomic_write
from pi_agent.host import Host
from pi_agent.regressor import Regressor, gate, read_history, read_reference

METADATA = (
    "host", "board", "board_model", "model_sha256", "quant", "test_kind", "llama_cpp_build",
    "temp_before_c", "temp_after_c", "throttled_before", "throttled_after",
)  # fmt: skip
LIMITS = {"n_prompt": (0, 4096), "n_gen": (0, 1024), "repetitions": (1, 20), "threads": (1, 64)}


class BenchError(RuntimeError):
    """llama-bench failed or was asked for something invalid."""


@dataclass(frozen=True)
class BenchParams:
    """What to run: thread counts, prompt and generation lengths, repetitions."""

    threads: tuple[int, ...] = (4,)
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 3

    def __post_init__(self) -> None:
        for name in ("n_prompt", "n_gen", "repetitions"):
            low, high = LIMITS[name]
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise BenchError(f"{name} must be an integer in [{low}, {high}]")
        low, high = LIMITS["threads"]
        if (
            not self.threads
            or len(self.threads) > 8
            or not all(
                isinstance(t, int) and not isinstance(t, bool) and low <= t <= high
                for t in self.threads
            )
        ):
            raise BenchError(f"threads must be 1-8 integers in [{low}, {high}]")
        if self.n_prompt == 0 and self.n_gen == 0:
            raise BenchError("n_prompt and n_gen cannot both be 0")


def quant_of(model_type: str) -> str:
    """``llama 135M Q4_1`` (llama-bench's model_type) → ``Q4_1``."""
    match = re.search(r"\b((?:I?Q\d\w*)|F16|BF16|F32)\b", model_type, re.IGNORECASE)
    return match.group(1).upper() if match else "unknown"


def _throttled(host: Host, vcgencmd: str) -> str:
    try:
        return hex(host.throttled(vcgencmd)[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return ""


def _temperature(host: Host) -> str:
    temp = host.temperature()
    return "" if temp is None else f"{temp:.1f}"


def run_llama_bench(
    binary: Path, model: Path, params: BenchParams, timeout: float
) -> list[dict[str, str]]:
    """Run llama-bench and parse its CSV."""
    cmd = [
        str(binary), "-m", str(model), "-o", "csv",
        "-t", ",".join(str(t) for t in params.threads),
        "-p", str(params.n_prompt), "-n", str(params.n_gen), "-r", str(params.repetitions),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"llama-bench took more than {timeout:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {binary}: {exc}") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-2:])
        raise BenchError(f"llama-bench exited with {done.returncode}: {tail}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if not rows:
        raise BenchError("llama-bench wrote no results")
    return rows


def run(
    *,
    binary: Path,
    model: Path,
    model_sha256: str,
    params: BenchParams,
    host: Host,
    out_dir: Path,
    vcgencmd: str = "",
    build: str = "",
    tolerance: float = 0.25,
    history: list[Path] | tuple[Path, ...] = (),
    board: str | None = None,
    timeout: float = 900.0,
    expected: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Benchmark, write the CSV and ``last.json``, and judge the result against the gate.

    ``expected`` (tokens/s by test kind, ``pp`` or ``tg``) replaces the regressor's prediction
    for those kinds: the operator's own expectation for a board the reference table gets wrong,
    or has no row for."""
    expected = expected or {}
    meta = {
        "host": host.hostname(),
        "board": board or host.board(),
        "board_model": _safe(host.board_model),
        "model_sha256": model_sha256,
        "llama_cpp_build": build,
        "temp_before_c": _temperature(host),
        "throttled_before": _throttled(host, vcgencmd),
    }
    started = time.time()
    rows = run_llama_bench(binary, model, params, timeout)
    meta["temp_after_c"] = _temperature(host)
    meta["throttled_after"] = _throttled(host, vcgencmd)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = sorted(out_dir.glob("*.csv"))
    regressor = Regressor(read_reference() + read_history([*previous, *history]))
    results = []
    for row in rows:
        row["quant"] = quant_of(row.get("model_type", ""))
        row["test_kind"] = "tg" if int(row.get("n_gen") or 0) > 0 else "pp"
        row.update({k: v for k, v in meta.items() if k in METADATA})
        count = row.get("n_gen") if row["test_kind"] == "tg" else row.get("n_prompt")
        threads = int(row["n_threads"])
        if row["test_kind"] in expected:
            predicted, source = float(expected[row["test_kind"]]), "expected"
        else:
            predicted = regressor.predict(
                meta["board"], int(row["model_n_params"]), row["quant"], threads, row["test_kind"]
            )
            source = "regressor" if predicted is not None else ""
        results.append({
            "test": f"{row['test_kind']}{count}",
            "threads": threads,
            "tokens_per_second": float(row["avg_ts"]),
            "stddev": float(row.get("stddev_ts") or 0.0),
            "predicted": None if predicted is None else round(predicted, 3),
            "predicted_by": source,
        })  # fmt: skip
    fields = list(rows[0].keys())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    csv_path = out_dir / f"{stamp}-{meta['host']}.csv"
    atomic_write(csv_path, buffer.getvalue())
    summary = {
        "csv": str(csv_path),
        "started_at": started,
        "finished_at": time.time(),
        "params": {
            "threads": list(params.threads),
            "n_prompt": params.n_prompt,
            "n_gen": params.n_gen,
            "repetitions": params.repetitions,
        },
        "metadata": {
            **meta,
            "quant": rows[0]["quant"],
            "model_n_params": rows[0].get("model_n_params"),
        },
        "results": results,
        "gate": gate(results, tolerance),
    }
    atomic_write(out_dir / "last.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _safe(read: Any) -> str:
    try:
        return str(read())
    except (OSError, ValueError):
        return ""
