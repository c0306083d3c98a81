"""What ``distill label`` is given and what a teacher hands back: arguments, one call's generation
settings, an answer, and the protocol every backend follows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from distill.argspec import arg
from distill.label.servers import parse_teacher_urls
from distill.records import PROMPT_STYLES, Record

# OpenAI's API allows at most 20 top_logprobs (vLLM's default bound too); the local backend
# keeps up to 256: the embedded teacher's top 20 hold 84% of its mass, its top 100 92%.
MAX_LOGPROBS = 20
MAX_LOCAL_LOGPROBS = 256


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
        None,
        help="base URL of an OpenAI-compatible server (llama-server, vLLM, ollama); several "
        "separated by commas, each with its own concurrency after '#': "
        "http://gpu1:8080#8,http://gpu2:8080#2",
    )
    teacher_model: str = arg("teacher", help="model name sent to the --teacher-url server")
    teacher_tokenizer: str | None = arg(
        None,
        help="the --teacher-url model's tokenizer (local dir): its vocabulary hash is recorded, "
        "so distill train --loss kd can check the student shares it",
    )
    api_key: str | None = arg(
        None,
        help="API key for --teacher-url (or $OPENAI_API_KEY)",
        secret=True,
        env="OPENAI_API_KEY",
    )
    concurrency: int = arg(
        4, help="parallel requests to each --teacher-url server that has no #N of its own"
    )
    request_timeout: float = arg(300.0, help="seconds before a --teacher-url request fails")
    prompt_style: str = arg(
        "auto",
        help="chat: the model's chat template; plain: parts joined by blank lines; "
        "auto: chat when the teacher has a template",
        choices=("auto", *PROMPT_STYLES),
    )
    batch_size: int = arg(
        16, help="rows per batch; 8 batches are read, sorted and appended (fsync'd) at a time"
    )
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
    constrain_json: bool = arg(
        True,
        help="hold requires_json answers to their schema while generating (transformers: "
        "xgrammar; a server: response_format json_schema, else validate-and-retry)",
    )
    json_retries: int = arg(2, help="new attempts for an answer that is not valid JSON")
    retry_temperature: float = arg(
        0.3, help="sampling temperature of the first JSON retry (halved at each further one)"
    )
    repetition_penalty: float = arg(
        1.3, help="penalty on tokens already in the answer (1 = off; free-text rows only)"
    )
    no_repeat_ngram_size: int = arg(
        4, help="never repeat a token n-gram of this size in an answer (0 = off; free-text rows)"
    )
    quality_gate: bool = arg(
        True,
        help="reject degenerate answers (loops, repetition, truncation, --language); empty and "
        "schema-invalid answers are rejected either way",
    )
    max_repeat_ratio: float = arg(
        0.3,
        help="reject an answer whose repeated word 4-grams exceed this share of its 4-grams "
        "(0 = off)",
    )
    reject_truncated: bool = arg(
        True, help="reject an answer cut by --max-new-tokens in the middle of a sentence"
    )
    trim_truncated: bool = arg(
        True,
        help="cut such an answer back to its last finished sentence (its tokens and "
        "probabilities too) instead of rejecting it; rejected when no sentence ends in it "
        "(transformers backend)",
    )
    language: str = arg(
        "none",
        help="reject answers that read as another language than this one (fr or en; a "
        "stop-word check)",
        choices=("none", "fr", "en"),
    )
    logprobs: int = arg(
        0,
        help="record the teacher's top-K log-probabilities of every answer token (0 = off; at "
        f"most {MAX_LOGPROBS} from a --teacher-url server, {MAX_LOCAL_LOGPROBS} locally)",
    )
    skip_existing: bool = arg(False, help="skip ids already in the output or rejects (resume)")
    overwrite: bool = arg(False, help="replace an existing output instead of refusing")
    limit: int | None = arg(None, help="label only the first N rows of the input")
    seed: int = arg(0, help="random seed for sampling")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "concurrency", "repetition_penalty"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.temperature < 0 or self.retry_temperature < 0:
            raise ValueError("temperatures must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("--no-repeat-ngram-size must not be negative")
        if not 0 <= self.max_repeat_ratio <= 1:
            raise ValueError(f"--max-repeat-ratio must be in [0, 1], got {self.max_repeat_ratio}")
        most = MAX_LOGPROBS if self.teacher_url else MAX_LOCAL_LOGPROBS
        if not 0 <= self.logprobs <= most:
            where = "with --teacher-url" if self.teacher_url else "with a local teacher"
            raise ValueError(f"--logprobs must be in [0, {most}] {where}, got {self.logprobs}")
        if self.json_retries < 0:
            raise ValueError("--json-retries must not be negative")
        if self.request_timeout <= 0:
            raise ValueError("--request-timeout must be positive")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("--limit must be positive")
        if self.teacher and self.teacher_url:
            raise ValueError("--teacher and --teacher-url are two different teachers: pick one")
        if self.teacher_url is not None:
            parse_teacher_urls(self.teacher_url, self.concurrency)  # a bad URL fails here
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

    @property
    def logprobs_path(self) -> Path:
        """Where the teacher's probabilities go: ``OUTPUT.logprobs.bin``."""
        from distill.logprobs import sidecar_path

        return sidecar_path(self.output)


@dataclass
class Generation:
    """Settings of one generation call."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Recorded in each row's provenance (the loop guards only where they are on)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out


@dataclass
class Answer:
    """One generated answer: its text, its length in tokens, how it ended, the teacher's view."""

    text: str
    tokens: int
    # True: the teacher ended it (end-of-sequence); False: --max-new-tokens cut it; None: unknown.
    finished: bool | None = None
    logprobs: Any = None  # distill.logprobs.TokenLogprobs when --logprobs K
    # When --max-new-tokens cut it: the same answer up to its last finished sentence, if any.
    trimmed: Answer | None = None
    # On a trimmed answer: how many tokens were generated before it was cut back.
    cut_from: int | None = None
    # The server that answered (--teacher-url), recorded in the row's provenance.
    server: str | None = None


class Teacher(Protocol):
    """A model that answers records, a batch at a time."""

    style: str

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """One answer per record, in order."""

    def describe(self) -> dict[str, Any]:
        """Who answered: backend, model, revision, versions."""

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Prompt length of each record (for length-sorted batching)."""
