"""``distill export``: turn a Hugging Face model into GGUF files for llama.cpp, with checksums.

    distill export --model runs/demo/train/model --output-dir runs/demo/dist --name student
    distill export --model runs/demo/train/model --output-dir dist --quant Q8_0 Q4_K_M Q4_0 \\
        --imatrix-data runs/demo/labelled/quebecois_distill.jsonl
    distill export --model HuggingFaceTB/SmolLM2-135M-Instruct --revision main --output-dir dist
    distill export --model embedded:all-minilm-l6-v2 --output-dir dist --quant F16 Q8_0

The model is a local directory, an ``embedded:`` model or a hub id (``--revision``, and
``--hf-token`` or ``$HF_TOKEN``, which is never logged). llama.cpp's own ``convert_hf_to_gguf.py``
(run with the same tree's ``gguf-py``) writes an f16 or bf16 GGUF, then ``llama-quantize`` makes
each requested type, optionally guided by an importance matrix that ``llama-imatrix`` computes
over the held-out rows of ``--imatrix-data``. Encoders (BERT-style such as MiniLM) export as
embedding GGUFs the same way.

The output directory gets ``<name>-<quant>.gguf`` with a ``.sha256`` beside each (``sha256sum
-c`` format), ``<name>-tokenizer/`` (tokenizer files and folders, model card) and
``manifest.json`` (source, revision, quant types, sizes, hashes, llama.cpp pin). Intermediates
live in a temporary directory that ``--preserve-tmp-dir`` keeps; a failing tool names its
command and the tail of its output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.argspec import arg, describe

if TYPE_CHECKING:
    from distill.llamacpp import Tools

log = logging.getLogger(__name__)

QUANT_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M",
    "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M",
    "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)  # fmt: skip
# Types llama-quantize refuses without an importance matrix.
NEEDS_IMATRIX: tuple[str, ...] = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
OUTTYPES = ("f16", "bf16", "f32")
# ggml types llama-quantize takes for one tensor (--token-embedding-type, --output-tensor-type).
TENSOR_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
)  # fmt: skip
TOKENIZER_ASSETS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "config.json",
    "README.md",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# sentence-transformers module folders (1_Pooling, 2_Normalize): how embeddings are pooled.
ASSET_DIR = re.compile(r"^\d+_[A-Za-z]+$")
ENCODER_TYPES = ("bert", "nomic_bert", "roberta", "xlm-roberta", "modernbert", "distilbert")


class ExportError(RuntimeError):
    """An export step that failed; the message names the command and where intermediates are."""


@dataclass
class ExportArgs:
    """Arguments of ``distill export``."""

    model: str = arg(help="model to export: local directory, hub id or embedded:<name>")
    output_dir: Path = arg(help="directory for the GGUF files, checksums and manifest.json")
    name: str | None = arg(None, help="file name stem (default: the model directory's name)")
    revision: str | None = arg(None, help="hub revision (branch, tag or commit) of --model")
    hf_token: str | None = arg(None, help="hub token (or $HF_TOKEN)", secret=True, env="HF_TOKEN")
    quant: list[str] = arg(
        default_factory=lambda: ["Q8_0", "Q4_K_M"],
        help="llama-quantize types to write (F16 and BF16 copy the converted file)",
    )
    outtype: str = arg("f16", help="type of the converted (unquantized) GGUF", choices=OUTTYPES)
    imatrix_data: list[Path] | None = arg(
        None, help="JSONL rows whose held-out prompts and answers feed llama-imatrix"
    )
    imatrix_ctx: int = arg(256, help="context size of the llama-imatrix chunks")
    token_embedding_type: str | None = arg(
        None,
        help="keep the token embeddings in this type in every quantized file (e.g. f16: a small "
        "model's Q8_0 then follows the HF model more closely, at the cost of size)",
    )
    output_tensor_type: str | None = arg(
        None, help="likewise for the output tensor (models with tied embeddings have none)"
    )
    threads: int | None = arg(None, help="threads for llama-quantize and llama-imatrix")
    tmp_dir: Path | None = arg(None, help="parent of the temporary directory (default: output)")
    preserve_tmp_dir: bool = arg(False, help="keep the intermediates (f16 GGUF, imatrix, text)")
    overwrite: bool = arg(False, help="replace GGUF files that already exist")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.quant = [q.upper() for q in self.quant]
        if not self.quant:
            raise ValueError("quant: name at least one type")
        unknown = [q for q in self.quant if q not in QUANT_TYPES]
        if unknown:
            raise ValueError(
                f"quant: unknown type(s) {', '.join(unknown)} (known: {', '.join(QUANT_TYPES)})"
            )
        if len(set(self.quant)) != len(self.quant):
            raise ValueError("quant: a type is listed twice")
        needing = [q for q in self.quant if q in NEEDS_IMATRIX]
        if needing and not self.imatrix_data:
            raise ValueError(f"quant {', '.join(needing)}: needs --imatrix-data")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {self.name!r}")
        for name in ("token_embedding_type", "output_tensor_type"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.lower() not in TENSOR_TYPES:
                raise ValueError(
                    f"{name}: unknown type {value!r} (known: {', '.join(TENSOR_TYPES)})"
                )
            setattr(self, name, value.lower())
        if self.imatrix_ctx < 16:
            raise ValueError(f"imatrix_ctx: at least 16, got {self.imatrix_ctx}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be at least 1, got {self.threads}")
        if self.imatrix_data:
            self.imatrix_data = [Path(p) for p in self.imatrix_data]


def _tensor_type_flags(args: ExportArgs) -> list[str]:
    flags = []
    if args.token_embedding_type:
        flags += ["--token-embedding-type", args.token_embedding_type]
    if args.output_tensor_type:
        flags += ["--output-tensor-type", args.output_tensor_type]
    return flags


def model_kind(model_dir: Path) -> str:
    """``encoder`` for BERT-style models (embedding GGUF), ``decoder`` for causal LMs."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = " ".join(config.get("architectures") or [])
    if config.get("model_type") in ENCODER_TYPES or (
        "ForCausalLM" not in architectures
        and ("Bert" in architectures or "Roberta" in architectures)
    ):
        return "encoder"
    return "decoder"


def gguf_name(name: str, quant: str) -> str:
    """``<name>-<quant>.gguf``."""
    return f"{name}-{quant}.gguf"


def write_sha256(path: Path) -> str:
    """Write ``<file>.sha256`` in ``sha256sum`` format; return the hex digest."""
    from distill.models import sha256_file
    from distill.records import atomic_write_text

    digest = sha256_file(path)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest


def copy_tokenizer_assets(model_dir: Path, target: Path) -> list[str]:
    """Copy tokenizer files (and sentence-transformers module folders) into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    copied = []
    for name in TOKENIZER_ASSETS:
        source = model_dir / name
        if source.is_file():
            shutil.copy2(source, target / name)
            copied.append(name)
    for entry in sorted(model_dir.iterdir()):
        if entry.is_dir() and ASSET_DIR.match(entry.name):
            shutil.copytree(entry, target / entry.name)
            copied.append(entry.name + "/")
    return copied


def imatrix_text(paths: list[Path], model_dir: Path) -> tuple[str, int]:
    """Held-out prompts and answers (all rows when none is held out) as the imatrix corpus."""
    from transformers import AutoTokenizer

    from distill.encoding import row_style
    from distill.records import read_many, render_prompt

    records = read_many(paths)
    chosen = [r for r in records if r.split == "heldout"] or records
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = []
    for record in chosen:
        style = row_style(record, "auto", tokenizer)
        parts.append(render_prompt(record, style, tokenizer) + (record.assistant or ""))  # type: ignore[arg-type]
    return "\n\n".join(parts) + "\n", len(chosen)


def convert_to_gguf(tools: Tools, model_dir: Path, outfile: Path, outtype: str) -> list[str]:
    """llama.cpp's ``convert_hf_to_gguf.py`` (with the same tree's gguf-py) on an HF directory;
    return the command it ran."""
    from distill.llamacpp import run as run_tool

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools.gguf_py), *_pythonpath()])}
    cmd = [
        sys.executable,
        str(tools.converter),
        str(model_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
    ]
    run_tool(cmd, env=env)
    return cmd


def _threads(args: ExportArgs) -> str:
    return str(args.threads or max(1, (os.cpu_count() or 2)))


def run(args: ExportArgs) -> dict[str, Any]:
    """Convert, quantize, hash and write the manifest; return the summary."""
    from distill.llamacpp import LlamaCppError, require_tools
    from distill.llamacpp import run as run_tool
    from distill.models import resolve_model
    from distill.records import atomic_write_json

    started = time.perf_counter()
    log.info("export config: %s", json.dumps(describe(args), ensure_ascii=False))
    tools = require_tools()
    model_dir, source = resolve_model(args.model, revision=args.revision, token=args.hf_token)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    kind = model_kind(model_dir)
    name = args.name or _default_name(args.model, model_dir)
    outputs = {q: args.output_dir / gguf_name(name, q) for q in args.quant}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise ExportError(f"already exported (pass --overwrite to replace): {', '.join(existing)}")
    quantizer = tools.tool("llama-quantize")
    imatrix_tool = tools.tool("llama-imatrix") if args.imatrix_data else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tmp_parent = args.tmp_dir or args.output_dir
    tmp_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{name}-", dir=tmp_parent))
    log.info("intermediates in %s", tmp)
    ok = False
    try:
        converted = tmp / f"converted-{args.outtype}.gguf"
        convert_cmd = convert_to_gguf(tools, model_dir, converted, args.outtype)
        imatrix: dict[str, Any] | None = None
        if args.imatrix_data and imatrix_tool:
            text, rows = imatrix_text(args.imatrix_data, model_dir)
            corpus = tmp / "imatrix-corpus.txt"
            corpus.write_text(text, encoding="utf-8")
            matrix = tmp / "imatrix.gguf"
            run_tool(
                [
                    str(imatrix_tool),
                    "-m",
                    str(converted),
                    "-f",
                    str(corpus),
                    "-o",
                    str(matrix),
                    "-c",
                    str(args.imatrix_ctx),
                    "-t",
                    _threads(args),
                ]
            )
            imatrix = {"data": [str(p) for p in args.imatrix_data], "rows": rows}
            imatrix["sha256"] = write_sha256(matrix)
        files = []
        for quant, target in outputs.items():
            staged = tmp / target.name
            if quant == args.outtype.upper():
                shutil.copy2(converted, staged)
            else:
                cmd = [str(quantizer), *_tensor_type_flags(args)]
                if imatrix:
                    cmd += ["--imatrix", str(tmp / "imatrix.gguf")]
                cmd += [str(converted), str(staged), quant, _threads(args)]
                run_tool(cmd)
            staged.replace(target)
            files.append(
                {
                    "quant": quant,
                    "file": target.name,
                    "bytes": target.stat().st_size,
                    "sha256": write_sha256(target),
                }
            )
            log.info("wrote %s (%.1f MiB)", target, target.stat().st_size / 2**20)
        assets_dir = args.output_dir / f"{name}-tokenizer"
        assets = copy_tokenizer_assets(model_dir, assets_dir)
        manifest = {
            "name": name,
            "kind": kind,
            "source": {**source, "model": args.model},
            "outtype": args.outtype,
            "files": files,
            "tokenizer_dir": assets_dir.name,
            "tokenizer_assets": assets,
            "imatrix": imatrix,
            "tensor_types": {
                "token_embedding": args.token_embedding_type,
                "output": args.output_tensor_type,
            },
            "llama_cpp": tools.version(),
            "converter": "convert_hf_to_gguf.py (vendored gguf-py)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commands": {"convert": _shown(convert_cmd)},
        }
        manifest_path = args.output_dir / "manifest.json"
        atomic_write_json(manifest_path, checked_manifest(manifest_path, manifest))
        ok = True
    except LlamaCppError as err:
        where = (
            f"intermediates kept in {tmp}"
            if args.preserve_tmp_dir
            else "pass --preserve-tmp-dir to keep the intermediates"
        )
        raise ExportError(f"{err}\n{where}") from None
    finally:
        if args.preserve_tmp_dir:
            log.info("intermediates kept in %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    assert ok
    return {
        "output_dir": str(args.output_dir),
        "name": name,
        "kind": kind,
        "files": [f["file"] for f in files],
        "sizes_mib": {f["quant"]: round(f["bytes"] / 2**20, 2) for f in files},
        "manifest": str(args.output_dir / "manifest.json"),
        "tmp_dir": str(tmp) if args.preserve_tmp_dir else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _default_name(requested: str, model_dir: Path) -> str:
    if requested.startswith("embedded:"):
        return requested.split(":", 1)[1]
    stem = model_dir.name if model_dir.name not in ("model", "") else model_dir.parent.name
    if "/" in requested and not Path(requested).exists():
        stem = requested.rsplit("/", 1)[1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _shown(cmd: list[str]) -> str:
    return " ".join(cmd)


def checked_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The new manifest, refusing to replace one that describes another model."""
    if not path.is_file():
        return manifest
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return manifest
    if earlier.get("name") != manifest["name"]:
        raise ExportError(
            f"{path} describes model {earlier.get('name')!r}, not {manifest['name']!r}: "
            "export each model into its own --output-dir"
        )
    return manifest
