"""What the llama_cpp role needs to know about the workstation, as JSON on stdout.

    python workstation_facts.py            # run by the role on localhost, with the project's python

- the pin and the CMake flags of each build variant, from the project (distill.llamacpp), so the
  boards build exactly what the workstation builds; flags that only suit x86-64 compilers (the
  AMX switches) are listed apart and added on x86-64 boards only;
- the workstation's board class (architecture + CPU model, the slug the role computes on the
  boards) and its own llama.cpp builds (``seed_bin``: the native one; ``seed_bins``: every variant
  built), which can seed a class of the same architecture and CPU;
- the Raspberry Pi classes it can cross-compile for (``cross``: board -> -march, and whether
  Debian's aarch64 toolchain and arm64 OpenBLAS are installed), and ``distill``, the project's
  command that does it;
- ``bench_model``: the GGUF the variants are compared with when the inventory names none (the
  embedded SmolLM2-135M-Instruct Q4_1, the reference table's own model), "" without it.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path


def board_class(arch: str, model: str) -> str:
    """Same slug as the role's Jinja: lower case, runs of other characters as '_'."""
    return re.sub(r"[^a-z0-9]+", "_", f"{arch}-{model}".lower()).strip("_")


def cpu_model() -> str:
    """The first "Model name:" of lscpu, as the role reads it on the boards."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.removeprefix("Model name:").strip()
    return "unknown"


def main() -> int:
    from distill import llamacpp

    x86_only = ("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS=")
    variants = {}
    for variant in llamacpp.VARIANTS:
        flags = llamacpp.flags(variant)
        variants[variant] = {
            "flags": [f for f in flags if not f.startswith(x86_only)],
            "x86_64_flags": [f for f in flags if f.startswith(x86_only)],
        }
    tools = llamacpp.find_tools("native")
    built = {v: llamacpp.find_tools(v) for v in llamacpp.VARIANTS}
    arch = platform.machine()
    try:
        from distill.models import ModelError, embedded_teacher_gguf

        bench_model = str(embedded_teacher_gguf())
    except (ImportError, ModelError):
        bench_model = ""
    cross = {}
    for board, (march, core) in llamacpp.BOARDS.items():
        ready = {}
        for variant in llamacpp.VARIANTS:
            try:
                llamacpp.check_cross_toolchain(variant)
                ready[variant] = ""
            except llamacpp.LlamaCppError as exc:
                ready[variant] = str(exc)
        cross[board] = {"march": march, "tune": core, "missing": ready}
    json.dump(
        {
            "commit": llamacpp.LLAMA_CPP_COMMIT,
            "sdist": llamacpp.SDIST_VERSION,
            "source": str(llamacpp.root() / "src"),
            "variants": variants,
            "targets": list(llamacpp.TARGETS),
            "arch": arch,
            "class": board_class(arch, cpu_model()),
            "seed_bin": str(tools.bin) if tools else "",
            "seed_bins": {v: str(t.bin) for v, t in built.items() if t is not None},
            "cross": cross,
            "distill": str(Path(sys.executable).parent / "distill"),
            "bench_model": bench_model,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
