"""llama.cpp cross-built for a Raspberry Pi 4 (aarch64, Armv8.0-A) and run under qemu-user
decodes the same greedy tokens as the workstation's x86 build on an f16 GGUF, through
llama-server, the program the agent runs.

The arm64 programs run through ``qemu-aarch64-static -L /usr/aarch64-linux-gnu`` (Debian's
qemu-user-static and crossbuild-essential-arm64): no arm64 root file system is needed. CI runs
the tiny test model (fast under emulation); ``make test-arm64`` (marker ``emulation``) adds the
embedded teacher: the same greedy tokens on its f16 GGUF, and on its Q8_0 file log-probabilities
as close to the x86 f16 ones as the x86 Q8_0's are (llama-perplexity --kl-divergence, the
measure of the GGUF fidelity check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from distill import llamacpp
from distill.evaluate import NO_REPACK, gguf

pytestmark = pytest.mark.slow

# The cross toolchain's own arm64 libraries, ahead of any multiarch ones the host's ld.so.cache
# lists (libc6:arm64 comes with libopenblas-dev:arm64): the cross loader with the multiarch libc
# hangs at the first thread.
QEMU = ("qemu-aarch64-static", "-L", f"/usr/{llamacpp.CROSS}",
        "-E", f"LD_LIBRARY_PATH=/usr/{llamacpp.CROSS}/lib")  # fmt: skip
PROMPTS = (
    "Explique-moi comment on fait une tourtière, mon chum.",
    "What is the capital of Canada?",
    "Écris une courte phrase sur l'hiver à Montréal.",
)


@pytest.fixture(scope="module")
def builds() -> dict[str, llamacpp.Tools]:
    """The x86 build and the Pi 4 cross build, each with llama-server (what the agent runs)."""
    if shutil.which(QEMU[0]) is None:
        pytest.fail(f"{QEMU[0]}: not installed (make apt installs qemu-user-static)")
    return {
        "x86_64": llamacpp.build("native", targets=("llama-server",)),
        "aarch64": llamacpp.build("native", targets=("llama-server",), board="pi4"),
    }


def command(arch: str, tools: llamacpp.Tools, name: str) -> list[str]:
    program = str(tools.tool(name))
    return [*QEMU, program] if arch == "aarch64" else [program]


def greedy(arch: str, tools: llamacpp.Tools, model: Path, tokens: int) -> list[list[int]]:
    """Each prompt's greedy token ids, from llama-server (on x86, or the arm64 one under qemu)."""
    answers = []
    launcher = QEMU if arch == "aarch64" else ()
    with llamacpp.serve(model, ctx_size=256, threads=2, server=tools.tool("llama-server"),
                        launcher=launcher, startup_timeout=600) as url:  # fmt: skip
        for prompt in PROMPTS:
            body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "top_k": 1,
                    "seed": 0, "cache_prompt": False, "return_tokens": True}  # fmt: skip
            request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=900) as response:
                answers.append(json.loads(response.read())["tokens"])
    return answers


def same_greedy_tokens(builds: dict[str, llamacpp.Tools], model: Path, tokens: int) -> None:
    x86 = greedy("x86_64", builds["x86_64"], model, tokens)
    arm = greedy("aarch64", builds["aarch64"], model, tokens)
    assert sum(map(len, x86)) >= tokens, x86  # the model said something (it may stop early)
    assert arm == x86


def test_the_pi4_build_is_aarch64_for_armv8_0(builds: dict[str, llamacpp.Tools]) -> None:
    header = builds["aarch64"].tool("llama-server").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # aarch64
    record = (builds["aarch64"].bin.parent / "pidistill-build.json").read_text()
    assert "-DGGML_CPU_ARM_ARCH=armv8-a+crc" in record and "-mtune=cortex-a72" in record


def test_arm64_and_x86_decode_the_same_greedy_tokens_on_the_tiny_f16(
    builds: dict[str, llamacpp.Tools], tiny_gguf: Path
) -> None:
    same_greedy_tokens(builds, tiny_gguf, 32)


@pytest.fixture(scope="module")
def teacher(builds: dict[str, llamacpp.Tools]) -> dict[str, Path]:
    """The embedded teacher as f16 and Q8_0 GGUFs (the eval's cached ceiling files)."""
    from distill.models import resolve_model

    path, source = resolve_model(None)
    base, quants = gguf.teacher_ggufs(builds["x86_64"], path, source, "f16", ["Q8_0"])
    return {"F16": base, "Q8_0": quants["Q8_0"]}


@pytest.mark.emulation
def test_arm64_and_x86_decode_the_same_greedy_tokens_on_the_teacher_s_f16(
    builds: dict[str, llamacpp.Tools], teacher: dict[str, Path]
) -> None:
    same_greedy_tokens(builds, teacher["F16"], 16)


@pytest.mark.emulation
def test_arm64_q8_0_is_as_faithful_to_the_x86_f16_as_the_x86_q8_0(
    builds: dict[str, llamacpp.Tools], teacher: dict[str, Path], tmp_path: Path
) -> None:
    tools = {
        "x86_64": llamacpp.build("native", targets=("llama-perplexity",)),
        "aarch64": llamacpp.build("native", targets=("llama-perplexity",), board="pi4"),
    }
    text = tmp_path / "text.txt"
    text.write_text(" ".join(PROMPTS * 40))
    base = tmp_path / "f16.logits"
    perplexity = tools["x86_64"].tool("llama-perplexity")
    gguf.save_base_logits(perplexity, teacher["F16"], text, base, 128, 2, chunks=3)
    measured = {}
    for arch in ("x86_64", "aarch64"):
        done = subprocess.run(
            [*command(arch, tools[arch], "llama-perplexity"), "-m", str(teacher["Q8_0"]),
             "-c", "128", "-b", "128", NO_REPACK, "-t", "2", "--kl-divergence-base", str(base),
             "--kl-divergence"],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{arch}: {done.stderr[-2000:]}"
        measured[arch] = gguf.parse_kld_output(done.stdout + "\n" + done.stderr)
    shown = {a: (m["mean_kld"], m["same_top_p"]) for a, m in measured.items()}
    print("Q8_0 against the x86 f16 (mean KLD, same top p %):", shown)
    verdict = gguf.meets_goal(measured["aarch64"], measured["x86_64"])
    assert verdict["met"], (measured, verdict)
