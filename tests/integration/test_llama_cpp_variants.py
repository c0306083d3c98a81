"""Both llama.cpp builds the llama_cpp role weighs (native, OpenBLAS), benchmarked for real and
picked by roles/llama_cpp/files/pick_variant.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "llama_cpp" / "files" / "pick_variant.py"


@pytest.mark.slow
def test_real_llama_bench_outputs_of_both_builds(pi_agent_tiny_gguf: Path) -> None:
    from distill import llamacpp

    outputs = {}
    for variant in ("native", "openblas"):
        # llama-bench alone: the OpenBLAS build of llama-server would add minutes to CI.
        bench = ("llama-bench",)
        tools = llamacpp.find_tools(variant, bench) or llamacpp.build(variant, targets=bench)
        outputs[variant] = subprocess.run(
            [str(tools.bin / "llama-bench"), "-m", str(pi_agent_tiny_gguf), "-p", "32", "-n", "8",
             "-t", "1", "-r", "1", "-o", "json"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    cmd = [sys.executable, str(SCRIPT), "--prompt=32", "--gen=8"]
    done = subprocess.run(
        cmd, input=json.dumps(outputs), capture_output=True, text=True, check=True
    )
    decision = json.loads(done.stdout)
    bench = decision["bench"]
    assert set(bench) == {"native", "openblas"}
    assert all(b["pp"] > 0 and b["tg"] > 0 for b in bench.values())
    assert decision["variant"] == max(bench, key=lambda v: bench[v]["score"])
