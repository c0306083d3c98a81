"""GGUF fidelity with llama.cpp's own measure: ``llama-perplexity``'s KL divergence.

For one model, the unquantized GGUF (the export's f16, else a fresh conversion) reads the
held-out text once and saves its log-probabilities (``--kl-divergence-base``); each quantized
file then reads the same tokens (``--kl-divergence``) and llama-perplexity reports the mean
KL(base || quant), how often both pick the same top token ("same top p") and the ratio of the
two perplexities.

The text is the held-out prompts and answers, cut to whole chunks; one chunk of filler follows
them (see :func:`measure`) and only the running means after the last real chunk are read.

The teacher is measured the same way on the same text, quantized to the same types with the
same tensor-type flags: that is the ceiling of the architecture (a narrow model flips near-ties
under Q8_0 however it was trained). Its GGUFs are made once and cached under
``<cache>/ceiling/<teacher>-<hash>-llama.cpp-<commit>/``.

The goal, per quant: the student's mean KLD and same top p no worse than the teacher's own,
within two combined standard errors (the ``±`` llama-perplexity prints, combined as if
independent). Both are means over a few thousand tokens of one text; a smaller difference is
noise on that text, not a property of the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.evaluate.args import NO_REPACK, EvalArgs, EvalError
from distill.records import Record, atomic_write_json, build_prompt

log = logging.getLogger(__name__)

GOAL_SIGMAS = 2.0
FLOAT_TYPES = ("F32", "F16", "BF16")

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
_PM = r"\s*(?:±|\+/-)\s*"
# The final statistics (printed when at least 100 tokens were scored).
_SUMMARY = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "mean_kld": rf"Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}",
    "same_top_p": rf"Same top p:\s*{_NUM}{_PM}{_NUM}\s*%",
}
_PERCENTILES = {
    "kld_max": r"Maximum KLD:\s*" + _NUM,
    "kld_99": r"99\.0%\s+KLD:\s*" + _NUM,
    "kld_median": r"Median\s+KLD:\s*" + _NUM,
}
# One line per chunk: chunk, PPL(Q), ln(PPL(Q)/PPL(base)), KLD, RMS Δp %, same top p %, each
# with its ± (running values over the chunks so far).
_CHUNK = re.compile(
    rf"^\s*(\d+)\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}"
    rf"\s+{_NUM}{_PM}{_NUM}\s*%\s+{_NUM}{_PM}{_NUM}\s*%",
    re.MULTILINE,
)


def _finite(text: str, digits: int = 6) -> float | None:
    value = float(text)
    return round(value, digits) if math.isfinite(value) else None


def _chunk_stats(line: tuple[str, ...]) -> dict[str, Any]:
    """The running means of one chunk line (the PPL ratio from its logarithm)."""
    ppl, ppl_unc, ln_ratio, ln_ratio_unc, kld, kld_unc = line[1:7]
    same, same_unc = line[9:11]
    log_ratio = float(ln_ratio)
    ratio = math.exp(log_ratio) if math.isfinite(log_ratio) else math.nan
    result: dict[str, Any] = {
        "source": "chunk line",
        "ppl": _finite(ppl),
        "ppl_unc": _finite(ppl_unc),
        "ppl_base": None,
        "ppl_base_unc": None,
        "ppl_ratio": _finite(str(ratio)),
        "ppl_ratio_unc": _finite(str(ratio * float(ln_ratio_unc))),
        "mean_kld": _finite(kld),
        "mean_kld_unc": _finite(kld_unc),
        "same_top_p": _finite(same),
        "same_top_p_unc": _finite(same_unc),
        "chunks": int(line[0]),
    }
    if result["ppl"] is not None and result["ppl_ratio"]:
        result["ppl_base"] = round(result["ppl"] / result["ppl_ratio"], 6)
    return result


def parse_kld_output(output: str, chunk: int | None = None) -> dict[str, Any]:
    """The KL-divergence statistics of a ``llama-perplexity --kl-divergence`` run's output.

    ``same_top_p`` is a percentage, ``mean_kld`` in nats per token; each measure has its
    standard error as ``<name>_unc``. With ``chunk``, the running means printed after that
    chunk (``source: chunk line``). Without, the final statistics when they are all there
    (``source: statistics``), else the last chunk's line, whose running means are the same
    values over every token (llama-perplexity prints no final statistics under 100 scored
    tokens). At the pinned commit llama.cpp's asynchronous logger can lose the tail of the
    output at exit: an output without the wanted chunk's line is refused (ValueError, "tail
    was lost"). Non-finite values (an overflowing model) become None.
    """
    chunks = {int(line[0]): line for line in _CHUNK.findall(output)}
    announced = re.search(r"computing over (\d+) chunks", output)
    wanted = chunk or (int(announced.group(1)) if announced else max(chunks, default=None))
    found = {key: re.search(pattern, output) for key, pattern in _SUMMARY.items()}
    if chunk is None and all(found.values()):
        result: dict[str, Any] = {"source": "statistics"}
        for key, match in found.items():
            result[key] = _finite(match.group(1))  # type: ignore[union-attr]
            result[f"{key}_unc"] = _finite(match.group(2))  # type: ignore[union-attr]
        for key, pattern in _PERCENTILES.items():
            match = re.search(pattern, output)
            result[key] = _finite(match.group(1)) if match else None
        result["chunks"] = wanted
        return result
    if wanted in chunks:
        return _chunk_stats(chunks[wanted])
    if chunks:
        raise ValueError(f"the output stops at chunk {max(chunks)} of {wanted} (its tail was lost)")
    raise ValueError("no KL-divergence statistics in llama-perplexity's output")


def _tail(output: str, lines: int = 8) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _perplexity_cmd(tool: Path, model: Path, ctx: int, threads: int | None) -> list[str]:
    cmd = [str(tool), "-m", str(model), "-c", str(ctx), "-b", str(ctx), NO_REPACK]
    return cmd + (["-t", str(threads)] if threads else [])


def save_base_logits(
    tool: Path,
    model: Path,
    text_file: Path,
    logits_file: Path,
    ctx: int,
    threads: int | None,
    chunks: int | None = None,
) -> None:
    """Run the unquantized GGUF over the text (its first ``chunks`` chunks), saving its
    log-probabilities for the KLD runs."""
    from distill.llamacpp import run as run_tool

    cmd = _perplexity_cmd(tool, model, ctx, threads)
    cmd += ["-f", str(text_file), "--kl-divergence-base", str(logits_file)]
    cmd += ["--chunks", str(chunks)] if chunks else []
    result = run_tool(cmd)
    # A text too short for two chunks still exits 0, leaving the 12-byte header alone (magic
    # and n_ctx); the vocabulary size, chunk count and tokens follow only after a real run.
    if not logits_file.is_file() or logits_file.stat().st_size <= 20:
        output = result.stdout + "\n" + result.stderr
        raise EvalError(f"{' '.join(cmd)}: no log-probabilities saved:\n{_tail(output)}")


def kl_divergence(
    tool: Path,
    model: Path,
    logits_file: Path,
    ctx: int,
    threads: int | None,
    chunk: int | None = None,
    tries: int = 3,
) -> dict[str, Any]:
    """``llama-perplexity --kl-divergence`` of a GGUF against saved base log-probabilities,
    read after ``chunk`` (default: at the end).

    An output without the wanted statistics is run again, ``tries`` times in all: at the
    pinned commit llama.cpp's asynchronous logger can lose the tail of a run that exited 0
    (see :func:`parse_kld_output`), on a busy machine everything after the model's loading.
    The pinned build is patched to flush it before exit (``distill.llamacpp.PATCHES``); an
    external one (``$PIDISTILL_LLAMA_CPP_BIN``) may not be.
    """
    from distill.llamacpp import run as run_tool

    cmd = _perplexity_cmd(tool, model, ctx, threads)
    cmd += ["--kl-divergence-base", str(logits_file), "--kl-divergence"]
    for attempt in range(1, tries + 1):
        result = run_tool(cmd)
        output = result.stdout + "\n" + result.stderr
        try:
            return parse_kld_output(output, chunk)
        except ValueError as err:
            if attempt == tries:
                raise EvalError(
                    f"{' '.join(cmd)}: {err} ({tries} runs):\n{_tail(output)}"
                ) from None
            log.warning("%s: %s; running it again (%d of %d)", model.name, err, attempt + 1, tries)
    raise AssertionError("unreachable")


def measure(
    tool: Path,
    base: Path,
    quants: Mapping[str, Path],
    text: str,
    n_tokens: int,
    ctx: int,
    threads: int | None,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    """KLD statistics of each quantized GGUF against the base GGUF, over ``text``
    (``n_tokens`` long): the running means after its last whole chunk.

    A filler chunk (the text's first half again) follows the measured ones: an unpatched
    llama.cpp's logger can drop what a run prints just before it exits (see
    :func:`kl_divergence`), and the extra pass gives it time to print the measured chunk's
    line. The filler's own numbers are never read.
    """
    # Two tokens of slack: llama.cpp may count the text a token or two longer than HF.
    chunks = max(1, (n_tokens - 2) // ctx)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        text_file = Path(tmp) / "heldout.txt"
        text_file.write_text(text + "\n" + text[: len(text) // 2 + 1], encoding="utf-8")
        logits = Path(tmp) / "base.logits"
        save_base_logits(tool, base, text_file, logits, ctx, threads, chunks + 1)
        for quant, path in quants.items():
            out[quant] = {
                "file": path.name,
                "mib": round(path.stat().st_size / 2**20, 2),
                **kl_divergence(tool, path, logits, ctx, threads, chunks),
                "scored_tokens": chunks * (ctx - 1 - ctx // 2),
            }
            log.info(
                "%s: mean KLD %s, same top p %s%%, PPL ratio %s",
                path.name,
                out[quant]["mean_kld"],
                out[quant]["same_top_p"],
                out[quant]["ppl_ratio"],
            )
    return out


def meets_goal(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
    """Whether a student quant's mean KLD and same top p are no worse than the teacher's same
    quant, within ``GOAL_SIGMAS`` combined standard errors."""
    if student.get("mean_kld") is None or student.get("same_top_p") is None:
        return {"met": False, "why": "the student's statistics are not finite"}
    if teacher.get("mean_kld") is None or teacher.get("same_top_p") is None:
        return {"met": None, "why": "the teacher's statistics are not finite"}
    kld_tol = GOAL_SIGMAS * math.hypot(
        student.get("mean_kld_unc") or 0.0, teacher.get("mean_kld_unc") or 0.0
    )
    top_tol = GOAL_SIGMAS * math.hypot(
        student.get("same_top_p_unc") or 0.0, teacher.get("same_top_p_unc") or 0.0
    )
    kld_ok = student["mean_kld"] <= teacher["mean_kld"] + kld_tol
    top_ok = student["same_top_p"] >= teacher["same_top_p"] - top_tol
    return {
        "met": kld_ok and top_ok,
        "mean_kld_ok": kld_ok,
        "same_top_p_ok": top_ok,
        "teacher_mean_kld": teacher["mean_kld"],
        "teacher_same_top_p": teacher["same_top_p"],
        "mean_kld_tolerance": round(kld_tol, 6),
        "same_top_p_tolerance": round(top_tol, 3),
    }


# ----------------------------------------------------------------------------- the teacher


def _teacher_key(teacher_dir: Path, source: Mapping[str, Any]) -> str:
    """What identifies the teacher's weights: its name and revision, else their hashes."""
    from distill.models import sha256_file

    if source.get("revision") and source.get("source") != "local":
        return f"{source.get('name')}@{source['revision']}"
    weights = sorted(
        p
        for p in teacher_dir.iterdir()
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    return ";".join(f"{p.name}:{sha256_file(p)}" for p in weights)


def ceiling_dir(teacher_dir: Path, source: Mapping[str, Any]) -> Path:
    """Where the teacher's GGUFs are cached, keyed by the teacher and the llama.cpp commit."""
    from distill.llamacpp import LLAMA_CPP_COMMIT
    from distill.models import cache_dir

    digest = hashlib.sha256(_teacher_key(teacher_dir, source).encode()).hexdigest()[:12]
    name = teacher_dir.name if source.get("source") == "local" else str(source.get("name"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[-40:] or "teacher"
    return cache_dir() / "ceiling" / f"{slug}-{digest}-llama.cpp-{LLAMA_CPP_COMMIT}"


def teacher_ggufs(
    tools: Any,
    teacher_dir: Path,
    source: Mapping[str, Any],
    outtype: str,
    quants: Sequence[str],
    tensor_types: Mapping[str, str | None] | None = None,
    threads: int | None = None,
) -> tuple[Path, dict[str, Path]]:
    """The teacher's unquantized GGUF and one GGUF per quant, made once and cached.

    ``tensor_types`` (the export manifest's) keeps the same tensors unquantized as in the
    student's files; such files are cached under their own names.
    """
    from distill.export import convert_to_gguf
    from distill.llamacpp import run as run_tool
    from distill.models import file_lock

    target = ceiling_dir(teacher_dir, source)
    target.mkdir(parents=True, exist_ok=True)
    flags: list[str] = []
    suffix = ""
    for key, flag in (
        ("token_embedding", "--token-embedding-type"),
        ("output", "--output-tensor-type"),
    ):
        if (tensor_types or {}).get(key):
            flags += [flag, str(tensor_types[key])]  # type: ignore[index]
            suffix += f"-{key}-{tensor_types[key]}"  # type: ignore[index]
    base = target / f"teacher-{outtype.upper()}.gguf"
    files: dict[str, Path] = {}
    with file_lock(target / ".lock"):
        if not base.is_file():
            log.info(
                "converting the teacher %s to %s (once) in %s",
                source.get("name"),
                base.name,
                target,
            )
            staged = target / f".{base.name}.partial"
            convert_to_gguf(tools, teacher_dir, staged, outtype)
            staged.replace(base)
        for quant in quants:
            if quant == outtype.upper():
                files[quant] = base
                continue
            path = target / f"teacher-{quant}{suffix}.gguf"
            if not path.is_file():
                staged = target / f".{path.name}.partial"
                quantizer = str(tools.tool("llama-quantize"))
                cores = str(threads or os.cpu_count() or 2)
                run_tool([quantizer, *flags, str(base), str(staged), quant, cores])
                staged.replace(path)
            files[quant] = path
        atomic_write_json(
            target / "ceiling.json",
            {
                "teacher": dict(source),
                "path": str(teacher_dir),
                "llama_cpp": tools.version(),
                "files": sorted(p.name for p in target.glob("teacher-*.gguf")),
            },
        )
    return base, files


# ----------------------------------------------------------------------------- the step


def heldout_text(rows: Sequence[Record]) -> str:
    """The held-out prompts and answers as plain text (no chat markup: llama-perplexity reads
    special-token strings as ordinary text)."""
    return "\n\n".join(build_prompt(r) + (r.assistant or "") for r in rows) + "\n"


def fit_ctx(n_tokens: int, ctx: int) -> int:
    """The chunk size, halved until the text holds two chunks (llama-perplexity needs that)."""
    while ctx > 16 and n_tokens < 2 * ctx + 8:
        ctx = max(16, ctx // 2)
    if n_tokens < 2 * ctx + 8:
        raise EvalError(
            f"the held-out text is {n_tokens} tokens: llama-perplexity needs at least "
            f"{2 * ctx + 8} (pass more rows)"
        )
    return ctx


def eval_ggufs(
    args: EvalArgs,
    rows: Sequence[Record],
    tokenizer: Any,
    model_dir: Path,
    teacher_dir: Path,
    teacher_source: Mapping[str, Any],
) -> dict[str, Any]:
    """``gguf``, ``teacher_ceiling`` and ``goal`` of eval.json for the files of ``--gguf-dir``."""
    from distill.export import convert_to_gguf
    from distill.llamacpp import require_tools

    assert args.gguf_dir is not None
    manifest_path = args.gguf_dir / "manifest.json"
    if not manifest_path.is_file():
        raise EvalError(f"{manifest_path}: missing (run distill export first)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("kind", "decoder") != "decoder":
        raise EvalError(f"{manifest_path}: a {manifest.get('kind')} export, not a causal LM")
    tools = require_tools()
    tool = tools.tool("llama-perplexity")
    outtype = str(manifest.get("outtype") or "f16")
    entries = {e["quant"]: args.gguf_dir / e["file"] for e in manifest.get("files", [])}
    text = heldout_text(rows)
    n_tokens = len(tokenizer(text)["input_ids"])
    ctx = fit_ctx(n_tokens, args.ppl_ctx)
    tensor_types = manifest.get("tensor_types") or {}
    setup = {
        "manifest": str(manifest_path),
        "rows": len(rows),
        "text_tokens": n_tokens,
        "ctx": ctx,
        "scored_tokens_per_chunk": ctx - 1 - ctx // 2,
        "tensor_types": tensor_types,
        "imatrix": bool(manifest.get("imatrix")),
    }
    with tempfile.TemporaryDirectory(prefix=".eval-", dir=args.run_dir) as tmp:
        work = Path(tmp)
        base = entries.get(outtype.upper())
        if base is None:
            base = work / f"student-{outtype.upper()}.gguf"
            convert_to_gguf(tools, model_dir, base, outtype)
        student = measure(tool, base, entries, text, n_tokens, ctx, args.threads, work)
        gguf = {**setup, "base": {"file": base.name, "type": outtype.upper()}, "quants": student}
        if not args.ceiling:
            return {"gguf": gguf, "teacher_ceiling": None, "goal": None}
        teacher_base, teacher_files = teacher_ggufs(
            tools, teacher_dir, teacher_source, outtype, list(entries), tensor_types, args.threads
        )
        teacher = measure(
            tool, teacher_base, teacher_files, text, n_tokens, ctx, args.threads, work
        )
    for quant, stats in student.items():
        stats["goal"] = meets_goal(stats, teacher[quant])
    ceiling = {
        "teacher": teacher_source.get("name"),
        "cache_dir": str(teacher_base.parent),
        "base": {"file": teacher_base.name, "type": outtype.upper()},
        "quants": teacher,
        "note": "the teacher quantized with the student's tensor-type flags"
        + (", without the student's importance matrix" if setup["imatrix"] else ""),
    }
    goal = {
        "quant": args.goal_quant,
        "rule": "the student's mean KLD and same top p no worse than the teacher's own "
        f"{args.goal_quant}, within {GOAL_SIGMAS:g} combined standard errors",
        "met": (student.get(args.goal_quant) or {}).get("goal", {}).get("met"),
    }
    return {"gguf": gguf, "teacher_ceiling": ceiling, "goal": goal}
