"""roles/llama_cpp/files/pick_variant.py: which llama.cpp build the llama_cpp role keeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "roles" / "llama_cpp" / "files" / "pick_variant.py"


def bench_json(pp: float, tg: float) -> str:
    """llama-bench -o json's shape: one entry per test (pp: n_gen 0; tg: n_prompt 0)."""
    return json.dumps([
        {"n_prompt": 256, "n_gen": 0, "avg_ts": pp, "model_filename": "m.gguf"},
        {"n_prompt": 0, "n_gen": 64, "avg_ts": tg, "model_filename": "m.gguf"},
    ])  # fmt: skip


# Measured on the workstation (issue 7): 2 threads, SmolLM2-135M Q4_1, same commit.
MEASURED = {"native": bench_json(238.0, 121.0), "openblas": bench_json(140.0, 129.0)}


def pick(outputs: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=json.dumps(outputs),
                          capture_output=True, text=True, check=False)  # fmt: skip


def test_a_request_weighs_prompt_processing_so_native_wins() -> None:
    done = pick(MEASURED)
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["variant"] == "native"
    assert "openblas generates faster" in decision["reason"]
    # (256 + 64) / (256/238 + 64/121) for native, the same for openblas
    assert decision["bench"]["native"]["score"] == pytest.approx(199.43, abs=0.01)
    assert decision["bench"]["openblas"]["score"] == pytest.approx(137.65, abs=0.01)


@pytest.mark.parametrize(("metric", "winner"), [("tg", "openblas"), ("pp", "native")])
def test_a_single_phase_metric_picks_its_fastest(metric: str, winner: str) -> None:
    done = pick(MEASURED, f"--metric={metric}")
    assert json.loads(done.stdout)["variant"] == winner


def test_a_variant_without_a_result_is_left_out_and_none_at_all_fails() -> None:
    done = pick({"native": MEASURED["native"], "openblas": "llama-bench: error"})
    assert json.loads(done.stdout)["variant"] == "native"
    assert list(json.loads(done.stdout)["bench"]) == ["native"]
    failed = pick({"native": "", "openblas": "[]"})
    assert failed.returncode == 1
    assert "no variant has a usable llama-bench result" in failed.stderr


def test_files_on_the_command_line(tmp_path: Path) -> None:
    for name, text in MEASURED.items():
        (tmp_path / f"{name}.json").write_text(text)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompt", "16", "--gen", "512",
         f"native={tmp_path / 'native.json'}", f"openblas={tmp_path / 'openblas.json'}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # A long answer to a short prompt: generation dominates and openblas's tg wins.
    assert json.loads(done.stdout)["variant"] == "openblas"
