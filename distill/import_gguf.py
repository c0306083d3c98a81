"""``distill import-gguf``: turn a ready-made GGUF into an export folder that site.yml deploys.

    distill import-gguf --gguf ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --output-dir dist/smollm2
    distill import-gguf --gguf https://example.org/models/tinyllama.Q4_K_M.gguf --output-dir dist/t
    distill import-gguf --gguf TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF \\
        --hub-file '*Q4_K_M.gguf' --revision main --output-dir dist/tinyllama

The GGUF is a local file, an http(s) URL (downloaded with a progress bar into the cache; an
interrupted download resumes where it stopped when the server takes ``Range``), or a hub id
whose file ``--hub-file`` picks (through ``huggingface_hub``, with ``--revision`` and
``--hf-token`` or ``$HF_TOKEN``, never logged). Its header is read with llama.cpp's own gguf-py
(the pinned tree's when it is unpacked, else the ``gguf`` package): architecture, quant type
(``general.file_type``), context length and tokenizer. A file that is not a GGUF, is cut short,
or has no tokenizer stops the import with one line naming it, before anything is written.

The output directory gets what ``distill export`` writes, so ``model_sync`` deploys it like any
student: ``<name>-<quant>.gguf``, its ``.sha256`` (``sha256sum -c`` format) and
``manifest.json`` (the same fields, with ``source.source: imported`` and a ``gguf`` block of what
the header says). A new directory appears whole (built beside it, then renamed); in an existing
one the manifest is replaced last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.argspec import arg, describe
from distill.export import checked_manifest, gguf_name
from distill.records import atomic_write_json

log = logging.getLogger(__name__)

# llama.cpp architectures that embed rather than generate (served with --embeddings).
ENCODER_ARCHITECTURES = (
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
    "neo-bert", "t5encoder",
)  # fmt: skip
_CHUNK = 1 << 20


class GgufError(ValueError):
    """A source that is not a usable GGUF; the message starts with the file or URL."""


class FetchError(RuntimeError):
    """A download that failed on the way (network, server); running again resumes it."""


@dataclass
class ImportGgufArgs:
    """Arguments of ``distill import-gguf``."""

    gguf: str = arg(help="the GGUF: a local file, an http(s) URL, or a hub id (org/name)")
    output_dir: Path = arg(help="export folder to write: the GGUF, its .sha256, manifest.json")
    name: str | None = arg(
        None, help="file name stem (default: the GGUF's file name without its quant suffix)"
    )
    quant: str | None = arg(
        None, help="quant label of the file (default: from general.file_type, e.g. Q4_K_M)"
    )
    hub_file: str | None = arg(
        None, help="with a hub id: the file to take, a glob such as '*Q4_K_M.gguf'"
    )
    revision: str | None = arg(None, help="hub revision (branch, tag or commit)")
    hf_token: str | None = arg(None, help="hub token (or $HF_TOKEN)", secret=True, env="HF_TOKEN")
    overwrite: bool = arg(False, help="replace a GGUF of the same name that is already there")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if not self.gguf:
            raise ValueError("gguf: name a file, a URL or a hub id")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {self.name!r}")
        if self.quant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", self.quant):
            raise ValueError(f"quant: letters, digits and '_' only, got {self.quant!r}")
        if self.hub_file and _kind_of(self.gguf) != "hub":
            raise ValueError("hub_file: only with a hub id as --gguf")


def _kind_of(source: str) -> str:
    if source.startswith(("http://", "https://")):
        return "url"
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        return "file"
    if source.endswith(".gguf") or source.count("/") != 1:
        return "file"  # a file that is not there: reported as such when read
    return "hub"


# ----------------------------------------------------------------------------- reading


def gguf_module() -> Any:
    """gguf-py: the pinned llama.cpp tree's when unpacked (the PyPI release lags it)."""
    if "gguf" not in sys.modules:
        from distill.llamacpp import root

        vendored = root() / "src" / "gguf-py"
        if (vendored / "gguf" / "__init__.py").is_file() and str(vendored) not in sys.path:
            sys.path.insert(0, str(vendored))
    import gguf

    return gguf


def _value(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_gguf(path: Path, shown: str | None = None) -> dict[str, Any]:
    """What a GGUF's header says (architecture, quant, context, tokenizer); ``GgufError`` when
    the file is not a GGUF, is cut short, or lacks what llama.cpp needs to serve it."""
    shown = shown or str(path)
    gguf = gguf_module()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GgufError(f"{shown}: no such file") from None
    if path.is_dir():
        raise GgufError(f"{shown}: a directory, not a GGUF file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise GgufError(f"{shown}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        if "cannot reshape" in str(err):  # a tensor's data runs past the end of the file
            raise GgufError(f"{shown}: truncated: {size} bytes, its tensor data is cut") from None
        raise GgufError(f"{shown}: unreadable GGUF header ({err}); truncated or damaged?") from None
    tensors = reader.tensors
    needed = max((t.data_offset + t.n_bytes for t in tensors), default=reader.data_offset)
    if size < needed:
        raise GgufError(
            f"{shown}: truncated: {size} bytes, its {len(tensors)} tensors end at byte {needed}"
        )
    arch = _value(reader, "general.architecture")
    if not arch:
        raise GgufError(f"{shown}: no general.architecture in the header")
    tokenizer_model = _value(reader, "tokenizer.ggml.model")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if not tokenizer_model or tokens is None:
        raise GgufError(
            f"{shown}: no tokenizer (tokenizer.ggml.model and tokens): llama.cpp cannot serve it"
        )
    file_type = _value(reader, "general.file_type")
    quant, guessed = _quant(gguf, file_type, tensors)
    return {
        "architecture": arch,
        "kind": "encoder" if arch in ENCODER_ARCHITECTURES else "decoder",
        "general_name": _value(reader, "general.name"),
        "file_type": file_type,
        "quant": quant,
        "quant_guessed": guessed,
        "context_length": _value(reader, f"{arch}.context_length"),
        "embedding_length": _value(reader, f"{arch}.embedding_length"),
        "block_count": _value(reader, f"{arch}.block_count"),
        "parameters": sum(int(t.n_elements) for t in tensors),
        "tensors": len(tensors),
        "tokenizer": {
            "model": tokenizer_model,
            "pre": _value(reader, "tokenizer.ggml.pre"),
            "tokens": len(tokens.data),
            "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
            "chat_template": reader.get_field("tokenizer.chat_template") is not None,
        },
        "gguf_version": _value(reader, "GGUF.version"),
        "bytes": size,
    }


def _quant(gguf: Any, file_type: int | None, tensors: list[Any]) -> tuple[str, bool]:
    """``Q4_K_M`` from ``general.file_type``; without it, the type holding most of the bytes."""
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            name = f"FILE_TYPE_{int(file_type)}"
        if name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_"), False
    weight: Counter[str] = Counter()
    for tensor in tensors:
        weight[tensor.tensor_type.name] += int(tensor.n_bytes)
    return (weight.most_common(1)[0][0] if weight else "UNKNOWN"), True


# ----------------------------------------------------------------------------- fetching


def download(url: str, target_dir: Path) -> Path:
    """Fetch ``url`` into ``target_dir`` with a progress bar on stderr. An interrupted download
    leaves ``<file>.part``, which the next call resumes with a ``Range`` request when the server
    honours it (else it starts again); the finished file is renamed from it."""
    import httpx
    from tqdm import tqdm

    shown = _redacted(url)
    target_dir.mkdir(parents=True, exist_ok=True)
    base = Path(urllib.parse.urlparse(url).path).name or "model.gguf"
    done = target_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"
    if done.is_file():
        return done
    part = done.with_name(done.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as resp:
            if resp.status_code == 416 and offset:  # the .part is no prefix of this file
                part.unlink()
                return download(url, target_dir)
            if resp.status_code >= 400:
                raise GgufError(f"{shown}: HTTP {resp.status_code} {resp.reason_phrase}")
            resumed = bool(offset) and resp.status_code == 206
            offset = offset if resumed else 0
            length = resp.headers.get("content-length")
            total = offset + int(length) if length and length.isdigit() else None
            if resumed:
                log.info("resuming %s at byte %d", shown, offset)
            with (
                part.open("ab" if resumed else "wb") as out,
                tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=base,
                    file=sys.stderr, disable=None,
                ) as bar,
            ):  # fmt: skip
                for block in resp.iter_bytes():  # as it arrives: a drop keeps it
                    out.write(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
    except httpx.HTTPError as err:
        raise FetchError(f"{shown}: download failed: {err} (run again to resume)") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise FetchError(f"{shown}: download stopped at {got} of {total} bytes (run again)")
    part.replace(done)
    return done


def resolve_source(args: ImportGgufArgs) -> tuple[Path, dict[str, Any]]:
    """The local GGUF for ``args.gguf`` and a record of where it came from."""
    kind = _kind_of(args.gguf)
    if kind == "file":
        path = Path(args.gguf).expanduser()
        return path, {"name": str(path), "revision": None, "source": "imported: file"}
    if kind == "url":
        from distill.models import cache_dir

        path = download(args.gguf, cache_dir() / "downloads")
        return path, {"name": _redacted(args.gguf), "revision": None, "source": "imported: url"}
    return _from_hub(args)


def _redacted(url: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", url)


def _from_hub(args: ImportGgufArgs) -> tuple[Path, dict[str, Any]]:
    from fnmatch import fnmatch

    from distill.models import resolve_model

    pattern = args.hub_file or "*.gguf"
    if not args.hub_file and not os.environ.get("HF_HUB_OFFLINE"):
        # Online, list the repository first: a bare "*.gguf" would download every quant.
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            names = HfApi().list_repo_files(args.gguf, revision=args.revision, token=args.hf_token)
        except HfHubHTTPError as err:
            raise GgufError(f"{args.gguf}: cannot list the repository: {err}") from None
        ggufs = [n for n in names if n.endswith(".gguf")]
        if len(ggufs) != 1:
            raise GgufError(
                f"{args.gguf}: {len(ggufs)} GGUF files ({', '.join(ggufs[:8]) or 'none'}): "
                "pick one with --hub-file"
            )
        pattern = ggufs[0]
    snapshot, _ = resolve_model(
        args.gguf, revision=args.revision, token=args.hf_token, allow_patterns=[pattern]
    )
    matches = sorted(
        p for p in snapshot.rglob("*.gguf") if fnmatch(p.relative_to(snapshot).as_posix(), pattern)
    )
    if len(matches) != 1:
        listed = ", ".join(p.relative_to(snapshot).as_posix() for p in matches) or "none"
        raise GgufError(f"{args.gguf}: --hub-file {pattern} matches {listed}: name exactly one")
    chosen = matches[0]
    return chosen, {
        "name": args.gguf,
        "revision": snapshot.name,  # the commit, whatever branch or tag named it
        "source": "imported: hub",
        "file": chosen.relative_to(snapshot).as_posix(),
    }


# ----------------------------------------------------------------------------- writing


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        while block := src.read(_CHUNK):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _default_name(basename: str, quant: str) -> str:
    """``SmolLM2-135M-Instruct`` from ``SmolLM2-135M-Instruct.Q4_1.gguf``: the file's own name
    (a header's ``general.name`` is often a training run's, and is kept in the manifest)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", basename.removesuffix(".gguf")).strip("-.")
    stem = re.sub(rf"[-._]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE)
    return stem or "model"


def run(args: ImportGgufArgs) -> dict[str, Any]:
    """Read, check, hash and lay out the GGUF with its manifest; return the summary."""
    from distill.llamacpp import LLAMA_CPP_COMMIT, SDIST_VERSION

    started = time.perf_counter()
    log.info("import-gguf config: %s", json.dumps(describe(args), ensure_ascii=False))
    path, source = resolve_source(args)
    shown = source["name"] if source["source"] != "imported: file" else str(path)
    downloaded = source["source"] == "imported: url"
    try:
        info = read_gguf(path, shown)
    except GgufError:
        if downloaded:
            path.unlink(missing_ok=True)  # a rerun must fetch it again, not reuse it
        raise
    quant = args.quant or info["quant"]
    basename = Path(urllib.parse.urlparse(args.gguf).path).name if downloaded else path.name
    name = args.name or _default_name(basename, quant)
    target = args.output_dir / gguf_name(name, quant)
    if target.exists() and not args.overwrite:
        raise GgufError(f"{target}: already there (pass --overwrite to replace it)")
    manifest_path = args.output_dir / "manifest.json"
    manifest: dict[str, Any] = {
        "name": name,
        "kind": info["kind"],
        "source": {**source, "model": _redacted(args.gguf)},
        "outtype": None,
        "files": [],
        "tokenizer_dir": None,
        "tokenizer_assets": [],
        "imatrix": None,
        "tensor_types": {"token_embedding": None, "output": None},
        "llama_cpp": {
            "llama_cpp_commit": LLAMA_CPP_COMMIT,
            "source": f"llama-cpp-python {SDIST_VERSION} sdist (vendor/llama.cpp)",
            "variant": None,
            "role": "gguf-py that read the header; the file was made elsewhere",
        },
        "converter": "none: imported as it is (distill import-gguf)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commands": {"import": f"distill import-gguf --gguf {_redacted(args.gguf)}"},
        "gguf": {k: v for k, v in info.items() if k != "bytes"},
    }
    checked_manifest(manifest_path, manifest)  # refuses a folder of another model first
    fresh = not args.output_dir.exists()
    parent = args.output_dir.parent if fresh else args.output_dir
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=parent))
    try:
        staged = stage / target.name
        digest = _copy_hashing(path, staged)
        if staged.stat().st_size != info["bytes"]:
            raise GgufError(f"{shown}: changed while it was copied")
        (stage / (target.name + ".sha256")).write_text(f"{digest}  {target.name}\n")
        manifest["files"] = [
            {"quant": quant, "file": target.name, "bytes": info["bytes"], "sha256": digest}
        ]
        atomic_write_json(stage / "manifest.json", manifest)
        if fresh:
            stage.chmod(0o755)  # mkdtemp's 0700 would become the folder's mode
            stage.rename(args.output_dir)
        else:
            staged.replace(target)
            (stage / (target.name + ".sha256")).replace(target.with_name(target.name + ".sha256"))
            (stage / "manifest.json").replace(manifest_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if downloaded:
        path.unlink(missing_ok=True)  # the export folder holds it now
    log.info("imported %s as %s (%s, %s)", shown, target, info["architecture"], quant)
    return {
        "output_dir": str(args.output_dir),
        "name": name,
        "kind": info["kind"],
        "architecture": info["architecture"],
        "quant": quant,
        "context_length": info["context_length"],
        "files": [target.name],
        "sha256": digest,
        "manifest": str(manifest_path),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
