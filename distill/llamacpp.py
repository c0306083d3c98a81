"""The pinned llama.cpp tools: find them, or build them once from the llama-cpp-python sdist.

    distill llamacpp build            # once: ~15-20 min of CPU on 2 cores
    distill llamacpp where            # print the bin directory and the pinned commit

No GitHub is reachable here, so the pinned source is the ``vendor/llama.cpp`` tree of the
``llama-cpp-python`` source distribution on PyPI (``pip download --no-binary :all:``). Its git
history is shallow, so the build number llama.cpp reports means nothing: the pin is recorded as
the sdist version and the llama.cpp commit it vendors.

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
        }


def root() -> Path:
    """``<cache>/llama.cpp``: the source tree and one build directory per variant."""
    return cache_dir() / "llama.cpp"


def flags(variant: str) -> tuple[str, ...]:
    """Every CMake flag of a build variant."""
    if variant not in VARIANTS:
        raise LlamaCppError(f"unknown build variant {variant!r} (known: {', '.join(VARIANTS)})")
    return (*CMAKE_FLAGS, *VARIANTS[variant])


def build_dir(variant: str) -> Path:
    """One build directory per variant and set of flags: changed flags mean a fresh build."""
    digest = hashlib.sha256("\n".join(flags(variant)).encode()).hexdigest()[:8]
    return root() / f"build-{variant}-{digest}"


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


def find_tools(variant: str = "native", targets: Sequence[str] = TARGETS) -> Tools | None:
    """The built tools (``targets`` of them), or ``None`` when they are not built yet."""
    override = os.environ.get("PIDISTILL_LLAMA_CPP_BIN")
    source = root() / "src"
    if override:
        return Tools(source=source, bin=Path(override), variant="external")
    bin_dir = build_dir(variant) / "bin"
    if all((bin_dir / t).is_file() for t in targets) and (source / "CMakeLists.txt").is_file():
        return Tools(source=source, bin=bin_dir, variant=variant)
    return None


def fetch_source() -> Path:
    """Unpack ``vendor/llama.cpp`` from the pinned sdist (``pip download``) into the cache."""
    source = root() / "src"
    if (source / "CMakeLists.txt").is_file():
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
        (Path(tmp) / "src").rename(source)
    return source


def build(
    variant: str = "native", jobs: int | None = None, targets: Sequence[str] = TARGETS
) -> Tools:
    """Configure and build the pinned tools (once; a second call finds them). ``targets``: a
    subset when only some are needed (``("llama-bench",)`` skips llama-server's long build);
    a later call for more builds the rest in the same directory."""
    target = build_dir(variant)
    found = find_tools(variant, targets)
    if found:
        return found
    with file_lock(root() / f"build-{variant}.lock"):
        found = find_tools(variant, targets)
        if found:
            return found
        source = fetch_source()
        extra, env = launcher()
        env = {**os.environ, **env}
        run(["cmake", "-S", str(source), "-B", str(target), *flags(variant), *extra], env=env)
        cores = str(jobs or os.cpu_count() or 2)
        run(["cmake", "--build", str(target), "-j", cores, "--target", *targets],
            env=env, stream=True)  # fmt: skip
        (target / "pidistill-build.json").write_text(
            json.dumps({"variant": variant, "commit": LLAMA_CPP_COMMIT, "flags": flags(variant)})
        )
    tools = find_tools(variant, targets)
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
) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 for the duration of a ``with`` block; yield its base URL.

    ``parallel`` slots share the context (each gets ``ctx_size``); the server is stopped with
    SIGTERM (then SIGKILL) on exit, and a server that dies at start-up raises with its command
    and log tail. ``server`` names a llama-server binary other than the pinned build's.
    """
    import urllib.error
    import urllib.request

    if server is None:
        server = (tools or require_tools()).tool("llama-server")
    port = free_port()
    cmd = [
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
