"""Shared fixtures: the sample data, a tiny local model, the pinned llama.cpp tools.

Nothing here reaches a model hub: the tiny model is made on the spot (a sentencepiece tokenizer
trained on the sample corpus and a randomly initialised LlamaForCausalLM), once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "dataset"
SAMPLE_FILES = (DATASET / "quebecois_distill.jsonl", DATASET / "quebecois_conversation.jsonl")

# Tests share the project cache (converted teacher, llama.cpp build) unless told otherwise.
os.environ.setdefault("PIDISTILL_CACHE_DIR", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_texts() -> list[str]:
    """Every system hint and user text of the sample data: the tiny tokenizer's corpus."""
    from distill.records import read_many

    texts = []
    for record in read_many(SAMPLE_FILES):
        texts.extend([record.system_hint, record.user])
    return texts


@pytest.fixture(scope="session")
def sample_files() -> tuple[Path, Path]:
    """The two sample JSONL files shipped in ``dataset/``."""
    return SAMPLE_FILES


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LlamaForCausalLM of a few hundred thousand parameters, with its sentencepiece tokenizer."""
    from distill.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), corpus_texts())


@pytest.fixture(scope="session")
def llama_tools():
    """The pinned llama.cpp build (`make llamacpp` builds it; `make test` depends on it)."""
    from distill.llamacpp import require_tools

    return require_tools()


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: Path, llama_tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model converted to an f16 GGUF by llama.cpp's own converter."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f16.gguf"
    env = {**os.environ, "PYTHONPATH": str(llama_tools.gguf_py)}
    subprocess.run(
        [
            sys.executable,
            str(llama_tools.converter),
            str(tiny_model),
            "--outfile",
            str(out),
            "--outtype",
            "f16",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return out


# A fleet CA like the one the pi_agent role makes, for the HTTPS tests (fleet-tui, distill chat).


def make_ca(base: Path, name: str) -> tuple[Path, Path]:
    """A throwaway CA (EC key, made with the ``openssl`` command line): its certificate and key."""
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    return base / f"{name}.pem", base / f"{name}.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fleet CA, an agent certificate it signed for 127.0.0.1 and localhost, and a second,
    foreign CA: ``ca``, ``cert``, ``key``, ``other_ca``."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    base = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(base, "fleet-ca")
    other_ca, _ = make_ca(base, "other-ca")
    subprocess.run(
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "agent.key", "-out", "agent.csr", "-subj", "/CN=pi-a"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    (base / "agent.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n"
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", "agent.csr", "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", "agent.pem", "-days", "2", "-extfile", "agent.ext"],
        cwd=base, check=True, capture_output=True,
    )  # fmt: skip
    return {"ca": ca, "cert": base / "agent.pem", "key": base / "agent.key", "other_ca": other_ca}
