"""Teacher labelling: a teacher model answers every prompt row; the answers become training data.

    distill label --input dataset/quebecois_distill.jsonl --output runs/demo/labelled.jsonl
    distill label --input prompts.jsonl --output out.jsonl \\
        --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct --revision main --batch-size 32
    distill label --input prompts.jsonl --output out.jsonl --teacher-url http://127.0.0.1:8080 \\
        --concurrency 8            # llama-server, vLLM, ollama: any OpenAI-compatible server
    distill label --input prompts.jsonl --output out.jsonl --skip-existing   # resume after a crash

Two backends. ``transformers`` loads a local directory or hub id into a text-generation
pipeline and feeds it prompts sorted by length in left-padded batches. ``openai`` sends the rows
to an OpenAI-compatible server, several requests at a time. With neither ``--teacher`` nor
``--teacher-url``, the embedded SmolLM2-135M-Instruct teacher answers.

Crash safety: the whole input is validated before anything is written; each batch's answers
are appended in one write with fsync; a torn last line left by a crash is cut on the next run;
``--skip-existing`` skips every id already in the output or the rejects file. A finished run
rewrites the output in input order (atomically), so a resumed run ends with the same file.

``requires_json`` rows: the answer must parse and validate against the row's ``json_schema``;
invalid answers are retried at a lower temperature, and rows that still fail go to the rejects
file with the reason, never dropped, never written as null.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from distill import argspec
from distill.argspec import arg
from distill.records import (
    PROMPT_STYLES,
    Record,
    append_rows,
    build_messages,
    check_json_answer,
    iter_json_lines,
    read_records,
    render_prompt,
    repair_torn_tail,
    write_rows_atomic,
)

log = logging.getLogger(__name__)


class LabelError(RuntimeError):
    """A labelling run that cannot go on (teacher unreachable, output in the way...)."""


@dataclass
class LabelArgs:
    """Arguments of ``distill label``."""

    input: Path = arg(help="JSONL prompt rows to label")
    output: Path = arg(help="JSONL file the labelled rows are appended to")
    rejects: Path | None = arg(
        None, help="where rows whose answers stay invalid go (default: OUTPUT.rejects.jsonl)"
    )
    teacher: str | None = arg(
        None, help="teacher model: local directory or hub id (default: the embedded SmolLM2)"
    )
    revision: str | None = arg(None, help="hub revision (branch, tag or commit) of --teacher")
    hf_token: str | None = arg(
        None, help="hub token for private models (or $HF_TOKEN)", secret=True, env="HF_TOKEN"
    )
    teacher_url: str | None = arg(
        None, help="base URL of an OpenAI-compatible server (llama-server, vLLM, ollama)"
    )
    teacher_model: str = arg("teacher", help="model name sent to the --teacher-url server")
    api_key: str | None = arg(
        None,
        help="API key for --teacher-url (or $OPENAI_API_KEY)",
        secret=True,
        env="OPENAI_API_KEY",
    )
    concurrency: int = arg(4, help="parallel requests to --teacher-url")
    request_timeout: float = arg(300.0, help="seconds before a --teacher-url request fails")
    prompt_style: str = arg(
        "auto",
        help="chat: the model's chat template; plain: parts joined by blank lines; "
        "auto: chat when the teacher has a template",
        choices=("auto", *PROMPT_STYLES),
    )
    batch_size: int = arg(16, help="rows per batch (and per fsync'd append)")
    max_new_tokens: int = arg(256, help="most tokens generated per answer")
    temperature: float = arg(0.7, help="sampling temperature (used with --do-sample)")
    do_sample: bool = arg(False, help="sample instead of greedy decoding")
    top_p: float = arg(1.0, help="nucleus sampling threshold (with --do-sample)")
    device_map: str = arg("auto", help="transformers device map: auto, cpu, cuda, cuda:0...")
    dtype: str = arg(
        "auto",
        help="weights dtype: auto (bf16 on a GPU that has it, else fp16 on a GPU; on the CPU bf16 "
        "where it is native (AVX512-BF16, AMX, Arm BF16), else fp32)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    json_retries: int = arg(2, help="new attempts for an answer that is not valid JSON")
    retry_temperature: float = arg(
        0.3, help="sampling temperature of the first JSON retry (halved at each further one)"
    )
    skip_existing: bool = arg(False, help="skip ids already in the output or rejects (resume)")
    overwrite: bool = arg(False, help="replace an existing output instead of refusing")
    limit: int | None = arg(None, help="label only the first N rows of the input")
    seed: int = arg(0, help="random seed for sampling")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.temperature < 0 or self.retry_temperature < 0:
            raise ValueError("temperatures must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.json_retries < 0:
            raise ValueError("--json-retries must not be negative")
        if self.request_timeout <= 0:
            raise ValueError("--request-timeout must be positive")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("--limit must be positive")
        if self.teacher and self.teacher_url:
            raise ValueError("--teacher and --teacher-url are two different teachers: pick one")
        if self.skip_existing and self.overwrite:
            raise ValueError("--skip-existing resumes, --overwrite starts again: pick one")
        self.input = Path(self.input)
        self.output = Path(self.output)
        if self.input.resolve() == self.output.resolve():
            raise ValueError("--output must differ from --input")
        if self.rejects is not None:
            self.rejects = Path(self.rejects)

    @property
    def rejects_path(self) -> Path:
        """``--rejects``, else ``OUTPUT.rejects.jsonl`` beside the output."""
        return self.rejects or self.output.with_name(self.output.stem + ".rejects.jsonl")


@dataclass
class Generation:
    """Settings of one generation call."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        """Recorded in each row's provenance."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return out


@dataclass
class Answer:
    """One generated answer and the tokens it took."""

    text: str
    tokens: int


class Teacher(Protocol):
    """A model that answers records, a batch at a time."""

    style: str

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """One answer per record, in order."""

    def describe(self) -> dict[str, Any]:
        """Who answered: backend, model, revision, versions."""

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Prompt length of each record (for length-sorted batching)."""


# ----------------------------------------------------------------------------- backends


def _torch_dtype(name: str, on_gpu: bool) -> Any:
    import torch

    if name == "auto":
        if not on_gpu:
            from distill.models import cpu_has_native_bf16

            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


class TransformersTeacher:
    """A transformers text-generation pipeline fed length-sorted, left-padded batches."""

    def __init__(self, args: LabelArgs) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        from distill.models import resolve_model

        path, self.source = resolve_model(args.teacher, revision=args.revision, token=args.hf_token)
        on_gpu = torch.cuda.is_available() and args.device_map != "cpu"
        device_map = args.device_map if on_gpu else "cpu"
        self.dtype = _torch_dtype(args.dtype, on_gpu)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, device_map=device_map)
        model.eval()
        self.tokenizer = tokenizer
        self.pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        self.style = _pick_style(args.prompt_style, tokenizer)
        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}
        self.device = str(model.device)

    def prompts(self, records: Sequence[Record]) -> list[str]:
        """The rendered prompt of each record."""
        return [render_prompt(r, self.style, self.tokenizer) for r in records]

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Token count of each prompt, in one batched tokenizer call."""
        encoded = self.tokenizer(self.prompts(records), add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """One batched generation for all records (no per-row loop)."""
        import torch

        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "return_full_text": False,
            "batch_size": len(records),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if gen.do_sample:
            kwargs.update(temperature=max(gen.temperature, 1e-3), top_p=gen.top_p)
            torch.manual_seed(gen.seed)
        else:
            # Greedy: unset the sampling knobs a model's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        # Chat prompts already hold the special tokens; plain prompts get the usual BOS.
        kwargs["add_special_tokens"] = self.style == "plain"
        with torch.inference_mode():
            outputs = self.pipe(self.prompts(records), **kwargs)
        texts = [out[0]["generated_text"].strip() for out in outputs]
        lengths = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [Answer(text, len(ids)) for text, ids in zip(texts, lengths, strict=True)]

    def describe(self) -> dict[str, Any]:
        """Backend, model and versions for the provenance record."""
        return {
            "backend": "transformers",
            "model": self.source["name"],
            "revision": self.source["revision"],
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            **self.versions,
        }


class OpenAITeacher:
    """Any OpenAI-compatible server: chat rows to /v1/chat/completions, plain to /v1/completions."""

    def __init__(self, args: LabelArgs) -> None:
        import httpx

        self.base = args.teacher_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model = args.teacher_model
        self.concurrency = args.concurrency
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(
            timeout=args.request_timeout,
            headers=headers,
            limits=httpx.Limits(max_connections=args.concurrency * 2),
        )
        self.style = "plain" if args.prompt_style == "plain" else "chat"
        self.server_model = self._probe()

    def _probe(self) -> str | None:
        import httpx

        try:
            response = self.client.get(f"{self.base}/models")
        except httpx.HTTPError as err:
            raise LabelError(f"teacher server {self.base} unreachable: {err}") from None
        if response.status_code in (401, 403):
            raise LabelError(
                f"teacher server {self.base} refused the API key (HTTP {response.status_code})"
            )
        try:
            data = response.json().get("data") or []
            return data[0].get("id") if data else None
        except (ValueError, AttributeError):
            return None

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Character counts stand in for token counts: only the order matters here."""
        return [len(render_prompt(r, "plain")) for r in records]

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import httpx

        delay = 1.0
        for attempt in range(4):
            try:
                response = self.client.post(f"{self.base}{path}", json=payload)
            except httpx.TransportError as err:
                problem = str(err) or type(err).__name__
            else:
                if response.status_code < 400:
                    return response.json()
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in (408, 429, 500, 502, 503, 504):
                    raise LabelError(f"teacher server {self.base}{path}: {problem}")
            if attempt < 3:
                log.warning("teacher request failed (%s); retrying in %.0fs", problem, delay)
                time.sleep(delay)
                delay *= 2
        raise LabelError(f"teacher server {self.base}{path} failed 4 times: {problem}")

    def _one(self, record: Record, gen: Generation) -> Answer:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature if gen.do_sample else 0.0,
        }
        if gen.do_sample:
            payload.update(top_p=gen.top_p, seed=gen.seed)
        if self.style == "chat":
            payload["messages"] = build_messages(record)
            data = self._post("/chat/completions", payload)
            text = data["choices"][0]["message"].get("content") or ""
        else:
            payload["prompt"] = render_prompt(record, "plain")
            data = self._post("/completions", payload)
            text = data["choices"][0].get("text") or ""
        usage = data.get("usage") or {}
        return Answer(text.strip(), int(usage.get("completion_tokens") or 0))

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """The batch's requests, ``--concurrency`` at a time."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, gen), records))

    def describe(self) -> dict[str, Any]:
        """Backend, server and model for the provenance record."""
        return {
            "backend": "openai",
            "model": self.server_model or self.model,
            "revision": None,
            "server": self.base,
        }


def _pick_style(requested: str, tokenizer: Any) -> str:
    if requested != "auto":
        if requested == "chat" and not getattr(tokenizer, "chat_template", None):
            raise LabelError("--prompt-style chat: the teacher's tokenizer has no chat template")
        return requested
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def make_teacher(args: LabelArgs) -> Teacher:
    """The backend the arguments ask for."""
    return OpenAITeacher(args) if args.teacher_url else TransformersTeacher(args)


# ----------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """What a labelling run did."""

    total: int = 0
    labelled: int = 0
    skipped: int = 0
    rejected: int = 0
    retried: int = 0
    tokens: int = 0
    seconds: float = 0.0
    output: str = ""
    rejects: str = ""
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second of generation."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For JSON output and the benchmark table."""
        return {
            "total": self.total,
            "labelled": self.labelled,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "retried": self.retried,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "output": self.output,
            "rejects": self.rejects,
        }


def _done_ids(path: Path) -> list[str]:
    """Ids already written to an output or rejects file (after cutting a torn tail)."""
    if not path.exists():
        return []
    cut = repair_torn_tail(path)
    if cut:
        log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, cut)
    ids = []
    for number, row in iter_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            from distill.records import RecordError

            raise RecordError(path, number, "id", "existing output row without a string id")
        ids.append(row["id"])
    return ids


def _provenance(
    record: Record, labeller: dict[str, Any], answer: Answer, attempts: int, gen: Generation
) -> dict[str, Any]:
    row = record.to_dict()
    metadata = dict(row["metadata"])
    provenance = dict(metadata["provenance"])
    provenance["labeller"] = {
        **labeller,
        "generation": gen.as_dict(),
        "attempts": attempts,
        "labelled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    metadata["provenance"] = provenance
    row["metadata"] = metadata
    row["assistant"] = answer.text
    return row


def label(
    args: LabelArgs,
    teacher: Teacher | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Label every row of ``args.input`` not yet done; return what happened.

    ``teacher`` may be given (tests, benchmarks); otherwise it is built from ``args``.
    ``progress(done, total)`` is called after each batch (the TUI uses it).
    """
    from tqdm import tqdm

    records = read_records(args.input)
    if args.limit:
        records = records[: args.limit]
    summary = Summary(total=len(records), output=str(args.output), rejects=str(args.rejects_path))
    done: set[str] = set()
    existing_output = args.output.exists() and args.output.stat().st_size > 0
    if existing_output and not (args.skip_existing or args.overwrite):
        raise LabelError(
            f"{args.output}: already holds rows; --skip-existing resumes, --overwrite replaces"
        )
    if args.overwrite:
        for path in (args.output, args.rejects_path):
            path.unlink(missing_ok=True)
    elif args.skip_existing:
        done_output = _done_ids(args.output)
        done = set(done_output) | set(_done_ids(args.rejects_path))
    todo = [r for r in records if r.id not in done]
    summary.skipped_ids = [r.id for r in records if r.id in done]
    summary.skipped = len(summary.skipped_ids)
    if summary.skipped:
        log.info(
            "skipping %d rows already labelled or rejected: %s",
            summary.skipped,
            ", ".join(summary.skipped_ids),
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        log.info("nothing to label: all %d rows are done", len(records))
        _finish(args, records)
        return summary
    teacher = teacher or make_teacher(args)
    labeller = {**teacher.describe(), "prompt_style": teacher.style, "tool": _tool_version()}
    log.info("teacher: %s", labeller)
    # Longest first: similar lengths share a batch (less padding), and a too-long batch fails
    # at the start, not after an hour.
    lengths = teacher.prompt_tokens(todo)
    order = sorted(range(len(todo)), key=lambda i: -lengths[i])
    batches = [
        [todo[i] for i in order[start : start + args.batch_size]]
        for start in range(0, len(order), args.batch_size)
    ]
    base = Generation(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.seed)
    bar = tqdm(
        total=len(todo),
        unit="row",
        desc="label",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    started = time.perf_counter()
    try:
        for batch in batches:
            good, bad = _label_batch(teacher, batch, base, args, labeller, summary)
            append_rows(args.output, good)
            append_rows(args.rejects_path, bad)
            summary.labelled += len(good)
            summary.rejected += len(bad)
            summary.seconds = time.perf_counter() - started
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{summary.tokens_per_second:.1f}", rejected=summary.rejected)
            if progress:
                progress(summary.labelled + summary.rejected, len(todo))
    finally:
        bar.close()
    _finish(args, records)
    return summary


def _label_batch(
    teacher: Teacher,
    batch: list[Record],
    base: Generation,
    args: LabelArgs,
    labeller: dict[str, Any],
    summary: Summary,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Answer a batch, retrying invalid JSON answers; return (labelled rows, reject rows)."""
    answers = teacher.answer(batch, base)
    summary.tokens += sum(a.tokens for a in answers)
    results: dict[str, tuple[Answer, int, Generation, str | None]] = {}
    for record, answer in zip(batch, answers, strict=True):
        results[record.id] = (answer, 1, base, _problem(record, answer))
    for attempt in range(1, args.json_retries + 1):
        failing = [r for r in batch if results[r.id][3] is not None and r.requires_json]
        if not failing:
            break
        gen = Generation(
            base.max_new_tokens,
            True,
            min(
                args.retry_temperature * 0.5 ** (attempt - 1),
                base.temperature if base.do_sample else args.retry_temperature,
            ),
            base.top_p,
            base.seed + attempt,
        )
        summary.retried += len(failing)
        retry_answers = teacher.answer(failing, gen)
        summary.tokens += sum(a.tokens for a in retry_answers)
        for record, answer in zip(failing, retry_answers, strict=True):
            results[record.id] = (answer, attempt + 1, gen, _problem(record, answer))
    good, bad = [], []
    for record in batch:
        answer, attempts, gen, problem = results[record.id]
        row = _provenance(record, labeller, answer, attempts, gen)
        if problem is None:
            good.append(row)
        else:
            row.pop("assistant")
            row["reject"] = {"reason": problem, "attempts": attempts, "last_answer": answer.text}
            bad.append(row)
    return good, bad


def _problem(record: Record, answer: Answer) -> str | None:
    if not answer.text.strip():
        return "empty answer"
    if record.requires_json and record.json_schema is not None:
        return check_json_answer(answer.text, record.json_schema)
    return None


def _finish(args: LabelArgs, records: list[Record]) -> None:
    """Rewrite the output in input order (atomic), rows from other inputs kept first."""
    if not args.output.exists():
        return
    rows = [row for _, row in iter_json_lines(args.output)]
    position = {r.id: i for i, r in enumerate(records)}
    rows.sort(key=lambda row: position.get(row.get("id"), -1))
    write_rows_atomic(args.output, rows)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pidistill {version('pidistill')}"
    except PackageNotFoundError:
        return "pidistill (source)"


def run(args: LabelArgs) -> dict[str, Any]:
    """The ``distill label`` stage: log the final config, label, return the summary."""
    log.info("distill label config: %s", argspec.describe(args))
    summary = label(args)
    return summary.as_dict()
