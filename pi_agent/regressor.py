"""The throughput regressor: expected tokens/s for a board, model size, quant and thread count.

Per board and test kind (``pp`` prompt processing, ``tg`` generation) it fits

    log(tokens/s) = a + b·log(params × bits per weight) + c·log(threads)

by least squares over the packaged reference table (``reference_throughput.csv``) and the fleet's
own benchmark history, history weighted above the reference. The slopes are pulled towards priors
(b = -1: generation is memory-bound, so tokens/s falls with the bytes read; c = 0.6: threads help
sublinearly) so a handful of rows still gives a sane fit. The packaged rows are estimates
extrapolated from publicly reported llama.cpp runs on Raspberry Pi 4 and 5 boards, not
measurements of this project: the fleet's history replaces them as it grows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REFERENCE = Path(__file__).with_name("reference_throughput.csv")
# Approximate bits per weight of llama.cpp quantisation types (block scales included).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69,
    "Q5_K_S": 5.54, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5,
    "Q4_1": 5.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_M": 3.91, "Q2_K": 3.35,
}  # fmt: skip
PRIOR_B = -1.0
PRIOR_C = 0.6
PRIOR_WEIGHT = 2.0
HISTORY_WEIGHT = 3.0


@dataclass(frozen=True)
class Observation:
    """One measured (or reference) throughput."""

    board: str
    params: int
    quant: str
    threads: int
    test: str  # "pp" or "tg"
    tokens_per_second: float
    source: str = "reference"


def bits_per_weight(quant: str) -> float:
    """Bits per weight of a quant name (``Q4_K_M``...); unknown names count as 16."""
    return BITS_PER_WEIGHT.get(quant.upper(), 16.0)


def read_reference(path: Path = REFERENCE) -> list[Observation]:
    """The packaged reference table."""
    with path.open(newline="") as handle:
        return [
            Observation(
                row["board"],
                int(row["params"]),
                row["quant"],
                int(row["threads"]),
                row["test"],
                float(row["tokens_per_second"]),
                row["source"],
            )
            for row in csv.DictReader(handle)
        ]


def read_history(paths: Iterable[Path]) -> list[Observation]:
    """Observations from benchmark CSVs written by ``pi_agent.bench`` (bad rows skipped)."""
    out = []
    for path in paths:
        try:
            with Path(path).open(newline="") as handle:
                for row in csv.DictReader(handle):
                    try:
                        out.append(Observation(
                            row["board"], int(row["model_n_params"]), row["quant"],
                            int(row["n_threads"]), row["test_kind"], float(row["avg_ts"]),
                            f"history:{Path(path).name}",
                        ))  # fmt: skip
                    except (KeyError, ValueError, TypeError):
                        continue
        except OSError:
            continue
    return out


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a 3x3 system."""
    a = [[*row, rhs] for row, rhs in zip(m, v, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-12:
            raise ZeroDivisionError("singular system")
        for r in range(3):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][3] / a[i][i] for i in range(3)]


class Regressor:
    """Fits per (board, test) once; ``predict`` answers ``None`` for an unknown board."""

    def __init__(self, observations: Iterable[Observation]) -> None:
        groups: dict[tuple[str, str], list[Observation]] = {}
        for obs in observations:
            if obs.tokens_per_second > 0 and obs.params > 0 and obs.threads > 0:
                groups.setdefault((obs.board, obs.test), []).append(obs)
        self.coefficients = {key: self._fit(rows) for key, rows in groups.items()}

    @staticmethod
    def _fit(rows: list[Observation]) -> tuple[float, float, float]:
        # Weighted ridge least squares towards the priors on b and c (not on the intercept).
        xtx = [[0.0] * 3 for _ in range(3)]
        xty = [0.0] * 3
        for obs in rows:
            w = HISTORY_WEIGHT if obs.source.startswith("history") else 1.0
            x = (1.0, math.log(obs.params * bits_per_weight(obs.quant)), math.log(obs.threads))
            y = math.log(obs.tokens_per_second)
            for i in range(3):
                xty[i] += w * x[i] * y
                for j in range(3):
                    xtx[i][j] += w * x[i] * x[j]
        xtx[1][1] += PRIOR_WEIGHT
        xty[1] += PRIOR_WEIGHT * PRIOR_B
        xtx[2][2] += PRIOR_WEIGHT
        xty[2] += PRIOR_WEIGHT * PRIOR_C
        a, b, c = _solve3(xtx, xty)
        return a, b, c

    def predict(self, board: str, params: int, quant: str, threads: int, test: str) -> float | None:
        """Expected tokens/s, or ``None`` without reference data for the board and test."""
        coefficients = self.coefficients.get((board, test))
        if coefficients is None or params <= 0 or threads <= 0:
            return None
        a, b, c = coefficients
        return math.exp(a + b * math.log(params * bits_per_weight(quant)) + c * math.log(threads))


def _named(row: dict[str, object]) -> str:
    return "expected" if row.get("predicted_by") == "expected" else "predicted"


def gate(results: list[dict[str, object]], tolerance: float) -> dict[str, object]:
    """Pass when every result with a prediction reaches ``(1 - tolerance)`` of it."""
    failures = []
    checked = 0
    for row in results:
        predicted = row.get("predicted")
        if predicted is None:
            continue
        checked += 1
        floor = float(predicted) * (1 - tolerance)  # type: ignore[arg-type]
        if float(row["tokens_per_second"]) < floor:  # type: ignore[arg-type]
            failures.append(
                f"{row['test']} with {row['threads']} threads: "
                f"{float(row['tokens_per_second']):.2f} tok/s < {floor:.2f} "  # type: ignore[arg-type]
                f"({1 - tolerance:.0%} of the {_named(row)} {float(predicted):.2f})"  # type: ignore[arg-type]
            )
    return {
        "passed": not failures,
        "checked": checked,
        "tolerance": tolerance,
        "failures": failures,
        "note": "" if checked else "no reference throughput for this board: nothing to check",
    }
