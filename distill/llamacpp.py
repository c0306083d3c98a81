"""The pinned llama.cpp tools: find them, or build them once from the llama-cpp-python sdist.

    distill llamacpp build            # once: ~15-20 min of CPU on 2 cores
    distill llamacpp build --board pi5 --variant openblas   # cross-compiled for a Pi class
    distill llamacpp where            # print the bin directory and the pinned commit

No GitHub is reachable here, so the pinned source is the ``vendor/llama.cpp`` tree of the
``llama-cpp-python`` source distribution on PyPI (``pip download --no-binary :all:``). Its git
history is shallow, so the build number llama.cpp reports means nothing: the pin is recorded as
the sdist version and the llama.cpp commit it vendors. One small patch is applied to it (see
:data:`PATCHES`): llama-perplexity flushes its log before it exits.

Only the needed targets are built, without the web UI (whose build would download it), tests or
examples, statically linked so the binaries can be copied to same-architecture hosts. When
``ccache`` is installed, compiles go through it (its cache under ``<cache>/llama.cpp/ccache``),
so the OpenBLAS variant can take ggml's CPU kernels from the native build: they are compiled
with the same flags; only ``GGML_USE_BLAS`` parts differ (the gain is not measured yet).
``$PIDISTILL_LLAMA_CPP_BIN`` points at an existing build instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.models import cache_dir, file_lock

log = logging.getLogger(__name__)

SDIST_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"
TARGETS: tuple[str, ...] = (
    "llama-server",
    "llama-quantize",
    "llama-bench",
    "llama-cli",
    "llama-imatrix",
    "llama-perplexity",
)
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
# -march=native turns on the AMX kernels on CPUs that have AMX; at this commit they crash
# (SIGSEGV in ggml_backend_amx_mul_mat on a Q4_1 model), and no Pi has AMX: keep them off.
if platform.machine() in ("x86_64", "AMD64"):
    _NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_FLAGS += (f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")
VARIANTS: dict[str, tuple[str, ...]] = {
    "native": ("-DGGML_NATIVE=ON",),
    "openblas": ("-DGGML_NATIVE=ON", "-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS"),
}
# The Raspberry Pi classes the workstation cross-compiles for, with Debian's aarch64-linux-gnu
# toolchain (apt crossbuild-essential-arm64; OpenBLAS as libopenblas-dev:arm64 through
# multiarch): ggml's -march (GGML_CPU_ARM_ARCH, since no -march=native can see the board) and
# the core to tune for. Pi 4: Cortex-A72, Armv8.0-A with CRC (no crypto, no dot product). Pi 5:
# Cortex-A76, Armv8.2-A with the dot product and half-precision arithmetic ggml's kernels use.
BOARDS: dict[str, tuple[str, str]] = {
    "pi4": ("armv8-a+crc", "cortex-a72"),
    "pi5": ("armv8.2-a+crc+dotprod+fp16", "cortex-a76"),
}
CROSS = "aarch64-linux-gnu"
# What the llama_cpp role installs on a board (llama_cpp_targets): the agent's llama-server and
# llama-bench (which also picks the variant), llama-cli and llama-quantize.
BOARD_TARGETS: tuple[str, ...] = ("llama-server", "llama-bench", "llama-cli", "llama-quantize")
# Changes to the pinned source, each one exact replacement (file, text, new text), applied once
# after unpacking (see :func:`apply_patches`). llama.cpp's logger prints from a worker thread,
# and the main logger is leaked on purpose at this commit (llama.cpp issue 22142); its header
# asks a program to call common_log_flush() before it exits. llama-perplexity does not, so
# what it prints last (the KL-divergence statistics the GGUF evaluation reads) can be lost at
# exit: 9 runs of 20 on an idle 2-core machine, 3 of 3 in a row on a busy CI machine.
PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        "tools/perplexity/perplexity.cpp",
        "    llama_backend_free();\n\n    return 0;\n}\n",
        "    llama_backend_free();\n\n"
        "    common_log_flush(common_log_main()); // pidistill: print the whole log before exit\n\n"
        "    return 0;\n}\n",
    ),
)


class LlamaCppError(RuntimeError):
    """A llama.cpp tool that is missing or failed; the message names the command."""


@dataclass(frozen=True)
class Tools:
    """Where one build of the pinned llama.cpp lives."""

    source: Path
    bin: Path
    variant: str

    def tool(self, name: str) -> Path:
        """Path of one binary (``llama-server``...), or a clear error if it was not built."""
        path = self.bin / name
        if not path.is_file():
            raise LlamaCppError(f"{path}: not built; run `distill llamacpp build`")
        return path

    @property
    def converter(self) -> Path:
        """llama.cpp's own ``convert_hf_to_gguf.py``."""
        return self.source / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        """The ``gguf-py`` of the same tree (the PyPI ``gguf`` release lags it)."""
        return self.source / "gguf-py"

    def version(self) -> dict[str, str]:
        """The pin, for manifests and model cards."""
        return {
            "llama_cpp_commit": LLAMA_CPP_COMMIT,
            "source": f"llama-cpp-python {SDIST_VERSION} sdist (vendor/llama.cpp)",
            "variant": self.variant,
            "patches": ", ".join(name for name, _, _ in PATCHES)
            if self.variant != "external"
            else "none",
        }


def root() -> Path:
    """``<cache>/llama.cpp``: the source tree and one build directory per variant."""
    return cache_dir() / "llama.cpp"


def flags(variant: str, board: str | None = None) -> tuple[str, ...]:
    """Every CMake flag of a build variant, for this machine or cross-compiled for ``board``."""
    if variant not in VARIANTS:
        raise LlamaCppError(f"unknown build variant {variant!r} (known: {', '.join(VARIANTS)})")
    if board is None:
        return (*CMAKE_FLAGS, *VARIANTS[variant])
    if board not in BOARDS:
        raise LlamaCppError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
    march, core = BOARDS[board]
    host_only = ("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS=")
    return (
        *(f for f in CMAKE_FLAGS if not f.startswith(host_only)),
        *(f for f in VARIANTS[variant] if f != "-DGGML_NATIVE=ON"),
        "-DCMAKE_SYSTEM_NAME=Linux",
        "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        f"-DCMAKE_C_COMPILER={CROSS}-gcc",
        f"-DCMAKE_CXX_COMPILER={CROSS}-g++",
        f"-DCMAKE_LIBRARY_ARCHITECTURE={CROSS}",
        "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
        "-DGGML_NATIVE=OFF",
        f"-DGGML_CPU_ARM_ARCH={march}",
        f"-DCMAKE_C_FLAGS=-mtune={core}",
        f"-DCMAKE_CXX_FLAGS=-mtune={core}",
    )


def build_dir(variant: str, board: str | None = None) -> Path:
    """One build directory per variant (and board), set of flags and source patches: changed
    flags or patches mean a fresh build."""
    key = "\n".join((*flags(variant, board), *("\0".join(p) for p in PATCHES)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return root() / (f"build-{variant}-{digest}" if board is None else
                     f"cross-{board}-{variant}-{digest}")  # fmt: skip


def launcher() -> tuple[tuple[str, ...], dict[str, str]]:
    """CMake flags and environment that compile through ccache, or nothing without it.

    Not part of a build's flags (nor of its directory's name): a build made without ccache is
    still found. ``CCACHE_BASEDIR`` makes the variants' sibling build directories hash alike.
    """
    if shutil.which("ccache") is None:
        return (), {}
    flags = ("-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    env = {"CCACHE_DIR": str(root() / "ccache"), "CCACHE_BASEDIR": str(root())}
    return flags, env


def find_tools(
    variant: str = "native", targets: Sequence[str] = TARGETS, board: str | None = None
) -> Tools | None:
    """The built tools (``targets`` of them), or ``None`` when they are not built yet."""
    override = os.environ.get("PIDISTILL_LLAMA_CPP_BIN")
    source = root() / "src"
    if override and board is None:
        return Tools(source=source, bin=Path(override), variant="external")
    bin_dir = build_dir(variant, board) / "bin"
    if all((bin_dir / t).is_file() for t in targets) and (source / "CMakeLists.txt").is_file():
        return Tools(source=source, bin=bin_dir, variant=variant)
    return None


def check_cross_toolchain(variant: str) -> None:
    """A clear error when Debian's arm64 cross toolchain (or arm64 OpenBLAS) is missing."""
    if shutil.which(f"{CROSS}-g++") is None:
        raise LlamaCppError(
            f"{CROSS}-g++: not found; cross-building for the Pis needs Debian's "
            "crossbuild-essential-arm64 (`make llamacpp-arm64` installs it as root)"
        )
    if variant == "openblas" and not Path(f"/usr/lib/{CROSS}/libopenblas.so").exists():
        raise LlamaCppError(
            f"/usr/lib/{CROSS}/libopenblas.so: not found; the OpenBLAS variant for the Pis needs "
            "`dpkg --add-architecture arm64 && apt-get update && apt-get install "
            "libopenblas-dev:arm64` (`make llamacpp-arm64` does it as root)"
        )


def apply_patches(source: Path, patches: Sequence[tuple[str, str, str]] = PATCHES) -> list[str]:
    """Apply :data:`PATCHES` to the source tree, each file rewritten atomically; a patch
    already there is skipped. Returns the files changed. A file whose text to replace is
    missing or not unique (another source than the pin's) is an error naming it."""
    from distill.records import atomic_write_text

    changed = []
    for name, old, new in patches:
        path = source / name
        text = path.read_text(encoding="utf-8")
        if new in text:
            continue
        found = text.count(old)
        if found != 1:
            raise LlamaCppError(
                f"{path}: cannot apply pidistill's patch: the text to replace is found "
                f"{found} times, not once (not the llama.cpp {LLAMA_CPP_COMMIT} source?)"
            )
        atomic_write_text(path, text.replace(old, new))
        changed.append(name)
    if changed:
        log.info("patched the llama.cpp source: %s", ", ".join(changed))
    return changed


def fetch_source() -> Path:
    """Unpack ``vendor/llama.cpp`` from the pinned sdist (``pip download``) into the cache,
    with :data:`PATCHES` applied (also to a tree unpacked before they existed)."""
    source = root() / "src"
    if (source / "CMakeLists.txt").is_file():
        apply_patches(source)
        return source
    root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root()) as tmp:
        log.info("downloading llama-cpp-python %s sdist (pinned llama.cpp source)", SDIST_VERSION)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={SDIST_VERSION}",
                "-d",
                tmp,
            ]
        )
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(Path(tmp) / "src", members=members, filter="data")
        apply_patches(Path(tmp) / "src")
        (Path(tmp) / "src").rename(source)
    return source


def build(
    variant: str = "native",
    jobs: int | None = None,
    targets: Sequence[str] | None = None,
    board: str | None = None,
) -> Tools:
    """Configure and build the pinned tools (once; a second call finds them). ``targets``: a
    subset when only some are needed (``("llama-bench",)`` skips llama-server's long build);
    a later call for more builds the rest in the same directory. ``board`` (``pi4``, ``pi5``)
    cross-compiles for that Pi class instead (by default its ``BOARD_TARGETS``)."""
    targets = tuple(targets or (TARGETS if board is None else BOARD_TARGETS))
    target = build_dir(variant, board)
    found = find_tools(variant, targets, board)
    if found:
        return found
    if board is not None:
        check_cross_toolchain(variant)
    lock = f"build-{variant}.lock" if board is None else f"cross-{board}-{variant}.lock"
    with file_lock(root() / lock):
        found = find_tools(variant, targets, board)
        if found:
            return found
        source = fetch_source()
        extra, env = launcher()
        env = {**os.environ, **env}
        if board is not None:  # pkg-config sees the arm64 .pc files (OpenBLAS), not the host's
            env["PKG_CONFIG_LIBDIR"] = f"/usr/lib/{CROSS}/pkgconfig:/usr/share/pkgconfig"
        started = time.monotonic()
        run(["cmake", "-S", str(source), "-B", str(target), *flags(variant, board), *extra],
            env=env)  # fmt: skip
        cores = str(jobs or os.cpu_count() or 2)
        run(["cmake", "--build", str(target), "-j", cores, "--target", *targets],
            env=env, stream=True)  # fmt: skip
        record = {"variant": variant, "board": board, "commit": LLAMA_CPP_COMMIT,
                  "flags": flags(variant, board), "targets": list(targets),
                  "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        (target / "pidistill-build.json").write_text(json.dumps(record))
    tools = find_tools(variant, targets, board)
    if tools is None:
        raise LlamaCppError(f"build finished but {target}/bin lacks some of {list(targets)}")
    return tools


def require_tools(variant: str = "native") -> Tools:
    """The tools, or an error that says how to build them."""
    tools = find_tools(variant)
    if tools is None:
        raise LlamaCppError(
            f"the pinned llama.cpp ({variant}) is not built under {root()}: "
            "run `make llamacpp` (or `distill llamacpp build`)"
        )
    return tools


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stream: bool = False,
    tail: int = 30,
) -> subprocess.CompletedProcess[str]:
    """Run a command, logged; on failure raise with the command and the tail of its output."""
    log.info("$ %s", " ".join(cmd))
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise LlamaCppError(f"{cmd[0]}: command not found")
    if stream:
        # Long builds: show progress as it comes, keep the tail for the error message.
        lines: list[str] = []
        with subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                del lines[:-tail]
                if line.startswith("[") and "%]" in line[:8]:
                    log.info("%s", line.rstrip())
            code = proc.wait()
        result = subprocess.CompletedProcess(cmd, code, "".join(lines), "")
    else:
        result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip().splitlines()[-tail:]
        raise LlamaCppError(
            f"command failed (exit {result.returncode}): {' '.join(cmd)}\n" + "\n".join(output)
        )
    return result


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# llama-server as a labelling teacher: every prompt is new, so its prompt cache in RAM (8 GiB by
# default at the pinned commit) only grows and slows each request (labelling-size measured 300
# rows/s falling to 34 after 50k rows with it, flat without).
TEACHER_FLAGS = ("--cache-ram", "0")


@contextlib.contextmanager
def serve(
    model: Path,
    *,
    parallel: int = 1,
    ctx_size: int = 2048,
    threads: int | None = None,
    extra: Sequence[str] = (),
    tools: Tools | None = None,
    server: Path | None = None,
    startup_timeout: float = 120.0,
    launcher: Sequence[str] = (),
) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 for the duration of a ``with`` block; yield its base URL.

    ``parallel`` slots share the context (each gets ``ctx_size``); the server is stopped with
    SIGTERM (then SIGKILL) on exit, and a server that dies at start-up raises with its command
    and log tail. ``server`` names a llama-server binary other than the pinned build's, and
    ``launcher`` a command that runs it (``qemu-aarch64-static -L ...`` for a cross build).
    """
    import urllib.error
    import urllib.request

    if server is None:
        server = (tools or require_tools()).tool("llama-server")
    port = free_port()
    cmd = [
        *launcher,
        str(server),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "--ctx-size",
        str(ctx_size * parallel),
        "--no-webui",
        *(["--threads", str(threads)] if threads else []),
        *extra,
    ]
    log.info("$ %s", " ".join(cmd))
    with tempfile.TemporaryFile("w+") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    logfile.seek(0)
                    tail = "\n".join(logfile.read().splitlines()[-20:])
                    raise LlamaCppError(
                        f"llama-server exited ({proc.returncode}): {' '.join(cmd)}\n{tail}"
                    )
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise LlamaCppError(f"llama-server not healthy after {startup_timeout:.0f}s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
