"""Talk to a Pi: stream answers from an agent's ``/v1/chat/completions`` on the workstation.

    distill chat --agent https://10.0.0.11:8470 --host pi-1            # interactive
    distill chat --agent https://10.0.0.11:8470 --host pi-1 --prompt "Salut, ça va?"
    distill chat --agent https://127.0.0.1:8470 --token-file tok --ca-file ca.pem \\
        --max-tokens 64 --temperature 0.2 --json-schema answer.schema.json --prompt "..."

The answer streams to stdout as the Pi generates it; the tokens/s line goes to stderr and, as
every stage's, one JSON summary line ends stdout. Interactively, each line you type is a turn of
one conversation: ``/reset`` starts a new one, ``/quit`` or end of input (ctrl+D) stops.

The token is ``--token-file``, else the fleet's token folder the pi_agent role fills
(``$PIDISTILL_CACHE_DIR/fleet/tokens/<host>``, else ``./.cache/...``; ``<host>`` is ``--host``,
else the URL's host name). The agent's certificate is verified against ``--ca-file``, else the
fleet's CA in that cache (``fleet/ca/ca.pem``), else the system's CAs: as ``fleet-tui`` does.

Per request the agent passes on max tokens, temperature, top-p, seed, stop strings and one
constraint (``--json-schema`` as ``response_format``, or a GBNF ``--grammar``). The seed's other
generation settings are the agent's, fixed when it starts llama-server, and these flags refuse
them with where to set them: context (``--ctx-size``), batch (``--batch-size``), KV-cache type
(``--cache-type``) and the prompt cache (``--cache-prompt``; llama-server keeps each slot's
prompt and reuses it by default, and the agent's ``decoder.cache_reuse`` tunes it; the summary's
``cached_tokens`` shows it working).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from distill.agent_client import (
    CHAT_TIMEOUT,
    AgentConnection,
    AgentError,
    ChatStats,
    fleet_ca,
    fleet_dir,
)
from distill.argspec import arg

log = logging.getLogger(__name__)

# The agent's request schema (pi_agent.openapi) bounds these; checked here so the flag is named.
MAX_TOKENS_LIMIT = 1024
# The agent takes at most 64 messages a request: older turns are dropped past that.
MAX_MESSAGES = 64
# Settings llama-server takes at start only: flag -> where the agent (and its role) sets it.
AGENT_SETTINGS = {
    "ctx_size": ("--ctx-size", "decoder.ctx_size", "pi_agent_ctx_size"),
    "batch_size": (
        "--batch-size",
        "decoder.batch_size and ubatch_size",
        "pi_agent_config: {decoder: {batch_size: N}}",
    ),
    "cache_type": (
        "--cache-type",
        "decoder.cache_type_k and cache_type_v",
        "pi_agent_config: {decoder: {cache_type_k: q8_0}}",
    ),
    "cache_prompt": (
        "--cache-prompt",
        "decoder.cache_reuse (llama-server reuses each slot's prompt by default)",
        "pi_agent_config: {decoder: {cache_reuse: N}}",
    ),
}


@dataclass
class ChatArgs:
    """Arguments of ``distill chat`` (see the module docstring)."""

    agent: str = arg(help="the agent's base URL, https://HOST:PORT")
    prompt: str | None = arg(None, help="ask this once and exit (default: an interactive loop)")
    system: str | None = arg(None, help="a system message at the start of the conversation")
    host: str | None = arg(
        None, help="inventory name of the Pi, for its token file (default: the URL's host)"
    )
    token_file: Path | None = arg(
        None, help="the agent's bearer token (default: the fleet's token folder, fleet/tokens/HOST)"
    )
    ca_file: Path | None = arg(
        None, help="the CA to verify the agent against (default: the fleet's CA in the cache)"
    )
    max_tokens: int = arg(256, help=f"most tokens an answer may take (1-{MAX_TOKENS_LIMIT})")
    temperature: float | None = arg(None, help="sampling temperature, 0-2 (default: the server's)")
    top_p: float | None = arg(None, help="nucleus sampling, 0-1 (default: the server's)")
    seed: int | None = arg(None, help="sampling seed, for answers that repeat")
    stop: list[str] | None = arg(None, help="strings that end the answer")
    json_schema: Path | None = arg(
        None, help="a JSON Schema file the answer must follow (sent as response_format)"
    )
    grammar: Path | None = arg(None, help="a GBNF grammar file the answer must follow")
    timeout: float = arg(CHAT_TIMEOUT, help="seconds to wait for the agent between two pieces")
    ctx_size: int | None = arg(None, help="refused: the agent's decoder.ctx_size")
    batch_size: int | None = arg(None, help="refused: the agent's decoder.batch_size")
    cache_type: str | None = arg(None, help="refused: the agent's decoder.cache_type_k/_v")
    cache_prompt: bool | None = arg(None, help="refused: the agent's decoder.cache_reuse")

    def __post_init__(self) -> None:
        for name, (flag, key, role) in AGENT_SETTINGS.items():
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{flag}: the agent's setting when it starts llama-server, not a request's: "
                    f"{key} in /etc/pi-agent/agent.toml (pi_agent role: {role})"
                )
        parts = urlsplit(self.agent)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--agent: expected http(s)://HOST:PORT, got {self.agent!r}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"--max-tokens: must be 1-{MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature: must be 0-2, got {self.temperature:g}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"--top-p: must be 0-1, got {self.top_p:g}")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("--json-schema and --grammar exclude each other: give one of them")
        if self.timeout <= 0:
            raise ValueError(f"--timeout: must be positive, got {self.timeout:g}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt: empty")
        files = {"--token-file": self.token_file, "--ca-file": self.ca_file,
                 "--json-schema": self.json_schema, "--grammar": self.grammar}  # fmt: skip
        for flag, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")


def load_schema(path: Path, flag: str = "--json-schema") -> dict[str, Any]:
    """A JSON Schema file as a dict; ValueError naming ``flag`` when it is not a JSON object."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"{flag} {path}: not JSON ({err})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{flag} {path}: a JSON Schema is an object, got {type(schema).__name__}")
    return schema


def chat_body(
    messages: list[dict[str, str]],
    max_tokens: int,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    schema: dict[str, Any] | None = None,
    grammar: str | None = None,
) -> dict[str, Any]:
    """An OpenAI chat request the agent accepts (its schema refuses any other field)."""
    if len(messages) > MAX_MESSAGES:  # keep the system message, drop the oldest turns
        head = messages[:1] if messages[0]["role"] == "system" else []
        messages = head + messages[len(head) - MAX_MESSAGES :]
    body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens}
    optional = {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}
    body.update({key: value for key, value in optional.items() if value is not None})
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        }
    if grammar is not None:
        body["grammar"] = grammar
    return body


def token_for(args: ChatArgs) -> str | None:
    """``--token-file``, else ``fleet/tokens/<host>`` in the cache, else ``None``."""
    if args.token_file is not None:
        path = Path(args.token_file)
    else:
        path = fleet_dir() / "tokens" / (args.host or urlsplit(args.agent).hostname or "")
        if not path.is_file():
            log.warning("no token: %s is not there (see --token-file, --host)", path)
            return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as err:
        raise ValueError(f"--token-file {path}: {err.strerror or err}") from None


def ask(connection: AgentConnection, body: dict[str, Any], out: TextIO) -> tuple[str, ChatStats]:
    """Stream one answer to ``out``; the whole answer and its stats."""
    pieces: list[str] = []
    stats: ChatStats | None = None
    for piece in connection.stream_chat(body):
        if isinstance(piece, str):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        else:
            stats = piece
    out.write("\n")
    out.flush()
    assert stats is not None  # stream_chat always ends with its stats
    return "".join(pieces), stats


def run(
    args: ChatArgs,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> dict:
    """Ask once (``--prompt``) or hold a conversation on ``stdin``; the summary.

    Answers go to ``stdout``, the rest of the conversation (tokens/s, errors) to ``stderr``."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    settings: dict[str, Any] = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }
    if args.json_schema is not None:
        settings["schema"] = load_schema(args.json_schema)
    if args.grammar is not None:
        settings["grammar"] = Path(args.grammar).read_text(encoding="utf-8")
    ca_file = args.ca_file or fleet_ca()
    connection = AgentConnection(args.agent, token_for(args), args.timeout, ca_file)
    log.info("chat with %s (CA %s)", args.agent, ca_file or "the system's")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    turns: list[ChatStats] = []
    answer = ""
    prompts = [args.prompt] if args.prompt is not None else _lines(stdin, stderr)
    for prompt in prompts:
        if prompt == "/reset":
            messages = list(system)
            stderr.write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": prompt})
        try:
            body = chat_body(messages, args.max_tokens, **settings)
            answer, stats = ask(connection, body, stdout)
        except AgentError as err:
            if args.prompt is not None:
                raise
            messages.pop()
            stderr.write(f"error: {err}\n")
            continue
        messages.append({"role": "assistant", "content": answer})
        turns.append(stats)
        stderr.write(f"[{stats.line()}]\n")
    if args.prompt is not None and args.json_schema is not None:
        try:
            json.loads(answer)
        except ValueError:
            raise AgentError("the answer is not the JSON the schema asks for") from None
    return _summary(args.agent, turns)


def _lines(stdin: TextIO, stderr: TextIO) -> Iterator[str]:
    """The user's turns: non-empty lines until ``/quit`` or end of input."""
    while True:
        if stdin.isatty():
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        if line.strip():
            yield line.strip()


def _summary(agent: str, turns: list[ChatStats]) -> dict[str, Any]:
    last = turns[-1] if turns else None
    return {
        "agent": agent,
        "turns": len(turns),
        "completion_tokens": sum(t.completion_tokens for t in turns),
        "tokens_per_s": round(last.tokens_per_s, 2) if last and last.tokens_per_s else None,
        "prompt_tokens": last.prompt_tokens if last else None,
        "cached_tokens": last.cached_tokens if last else None,
        "seconds": round(sum(t.seconds for t in turns), 3),
        "finish_reason": last.finish_reason if last else None,
    }
