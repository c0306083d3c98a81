"""The OpenAI-compatible teacher: llama-server, vLLM, ollama, several requests at a time, to one
server or several (:mod:`distill.label.servers`: load spreading, failover, ``Retry-After``).

``requires_json`` rows carry ``response_format: {"type": "json_schema", ...}``; a server that
refuses it (HTTP 4xx) is warned about once and the run goes on with validate-and-retry.
``--logprobs K`` asks for ``logprobs``/``top_logprobs`` on the chat endpoint and keeps them by
token id, so the server must report ids (llama-server does). The vocabulary's hash comes from
``--teacher-tokenizer`` when given (a server does not tell it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distill.label.args import Answer, Generation, LabelArgs, LabelError
from distill.label.servers import RETRYABLE, Pool, Server, parse_teacher_urls, retry_after
from distill.records import Record, build_messages, render_prompt

log = logging.getLogger(__name__)


class _Refused(Exception):
    """The server answered 4xx: the request itself is wrong, retrying it unchanged won't help."""

    def __init__(self, problem: str, server: str) -> None:
        super().__init__(problem)
        self.server = server


def _token_id(entry: dict[str, Any], server: str) -> int:
    if isinstance(entry.get("id"), int):
        return entry["id"]
    token = str(entry.get("token", ""))
    if token.startswith("token_id:"):
        return int(token.removeprefix("token_id:"))
    raise LabelError(
        f"teacher server {server} returns logprobs without token ids (llama-server gives them; "
        "start vLLM with --return-tokens-as-token-ids)"
    )


def _tokenizer_hash(path: str | None) -> str | None:
    if not path:
        return None
    from transformers import AutoTokenizer

    from distill.logprobs import vocab_hash

    return vocab_hash(AutoTokenizer.from_pretrained(path))


class OpenAITeacher:
    """Any OpenAI-compatible server: chat rows to /v1/chat/completions, plain to /v1/completions.

    Several servers (``--teacher-url A#8,B#2``) share the rows through a :class:`Pool`.
    """

    def __init__(self, args: LabelArgs) -> None:
        import httpx

        self.pool = Pool(parse_teacher_urls(args.teacher_url or "", args.concurrency))
        self.model = args.teacher_model
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(
            timeout=args.request_timeout,
            headers=headers,
            limits=httpx.Limits(max_connections=self.pool.capacity * 2),
        )
        self.style = "plain" if args.prompt_style == "plain" else "chat"
        self.constrain_json = args.constrain_json
        self.k = args.logprobs
        if self.k and self.style != "chat":
            raise LabelError("--logprobs with --teacher-url needs the chat style (token ids)")
        # Servers that refuse response_format fall back to validate-and-retry, once warned.
        self.schema_refused = False
        self.vocab_hash = _tokenizer_hash(args.teacher_tokenizer)
        self.server_models = self._probe()

    def _probe(self) -> dict[str, str | None]:
        """Each server's model id; an unreachable one is taken out while another answers."""
        import httpx

        models: dict[str, str | None] = {}
        unreachable: list[tuple[Server, str]] = []
        for server in self.pool.servers:
            models[server.url] = None
            try:
                response = self.client.get(f"{server.url}/models")
            except httpx.HTTPError as err:
                unreachable.append((server, str(err) or type(err).__name__))
                continue
            if response.status_code in (401, 403):
                raise LabelError(
                    f"teacher server {server.url} refused the API key (HTTP {response.status_code})"
                )
            with contextlib.suppress(ValueError, AttributeError, IndexError):
                models[server.url] = (response.json().get("data") or [{}])[0].get("id")
        if len(unreachable) == len(self.pool.servers):
            raise LabelError(
                "; ".join(f"teacher server {s.url} unreachable: {why}" for s, why in unreachable)
            )
        for server, problem in unreachable:
            self.pool.take_out(server, problem)
        return models

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Character counts stand in for token counts: only the order matters here."""
        return [len(render_prompt(r, "plain")) for r in records]

    def _post(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """POST with retries; a server that refuses ``response_format`` is asked again without.
        Returns the answer and the server that gave it."""
        if "response_format" in payload and not self.schema_refused:
            try:
                return self._send(path, payload)
            except _Refused as refused:
                self.schema_refused = True
                log.warning(
                    "teacher server %s refused response_format (%s): JSON rows fall back to "
                    "validate-and-retry",
                    refused.server,
                    refused,
                )
        payload = {k: v for k, v in payload.items() if k != "response_format"}
        try:
            return self._send(path, payload)
        except _Refused as refused:
            raise LabelError(f"teacher server {refused.server}{path}: {refused}") from None

    def _send(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """One request, sent again (to the least loaded server) while it fails: four tries per
        server in all."""
        import httpx

        tries = 4 * len(self.pool.servers)
        for _ in range(tries):
            server = self.pool.acquire()
            wait = None
            try:
                response = self.client.post(f"{server.url}{path}", json=payload)
                if response.status_code < 400:
                    data = response.json()
                    self.pool.succeeded(server)
                    return data, server.url
            except (httpx.TransportError, ValueError) as err:  # ValueError: a torn JSON body
                problem = str(err) or type(err).__name__
            except BaseException:
                self.pool.release(server)
                raise
            else:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRYABLE:
                    self.pool.release(server)
                    raise _Refused(problem, server.url)
                wait = retry_after(response.headers.get("retry-after"))
            self.pool.failed(server, problem, wait)
        raise LabelError(f"teacher request {path} failed {tries} times; last: {problem}")

    def _one(self, record: Record, gen: Generation) -> Answer:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature if gen.do_sample else 0.0,
        }
        if gen.do_sample:
            payload.update(top_p=gen.top_p, seed=gen.seed)
        if gen.repetition_penalty != 1.0:
            payload["repeat_penalty"] = gen.repetition_penalty  # llama-server and vLLM's name
        if self.constrain_json and record.requires_json and record.json_schema:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": record.json_schema, "strict": True},
            }
        if self.style == "chat":
            payload["messages"] = build_messages(record)
            if self.k:
                payload.update(logprobs=True, top_logprobs=self.k)
            data, server = self._post("/chat/completions", payload)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        else:
            payload["prompt"] = render_prompt(record, "plain")
            data, server = self._post("/completions", payload)
            choice = data["choices"][0]
            text = choice.get("text") or ""
        usage = data.get("usage") or {}
        reason = choice.get("finish_reason")
        finished = None if reason is None else reason != "length"
        logprobs = self._logprobs(record, choice, server) if self.k else None
        tokens = int(usage.get("completion_tokens") or 0)
        return Answer(text.strip(), tokens, finished, logprobs, server=server)

    def _logprobs(self, record: Record, choice: dict[str, Any], server: str) -> Any:
        """The server's top-K per answer token, as ids (llama-server gives ``id``; vLLM gives
        ``token_id:N`` tokens with ``--return-tokens-as-token-ids``)."""
        import numpy as np

        from distill.logprobs import TokenLogprobs

        content = ((choice.get("logprobs") or {}).get("content")) or []
        ids, top_ids, top_lp = [], [], []
        for entry in content:
            ids.append(_token_id(entry, server))
            top = sorted(entry.get("top_logprobs") or [], key=lambda c: -c["logprob"])[: self.k]
            if len(top) < self.k:
                raise LabelError(
                    f"{record.where}: teacher server {server} returned {len(top)} top "
                    f"logprobs, {self.k} asked"
                )
            top_ids.append([_token_id(c, server) for c in top])
            top_lp.append([max(float(c["logprob"]), -1e4) for c in top])
        shape = (len(ids), self.k)
        return TokenLogprobs(
            np.asarray(ids, dtype=np.int32),
            np.asarray(top_ids, dtype=np.int32).reshape(shape),
            np.asarray(top_lp, dtype=np.float32).reshape(shape),
        )

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """The batch's requests, as many at a time as the servers' concurrencies add up to."""
        with ThreadPoolExecutor(max_workers=self.pool.capacity) as pool:
            return list(pool.map(lambda r: self._one(r, gen), records))

    def describe(self) -> dict[str, Any]:
        """Backend, servers and model for the provenance record (each row adds ``server``:
        the one that answered it)."""
        models = [m for m in self.server_models.values() if m]
        return {
            "backend": "openai",
            "model": models[0] if models else self.model,
            "revision": None,
            "servers": [
                {"url": s.url, "concurrency": s.concurrency, "model": self.server_models[s.url]}
                for s in self.pool.servers
            ],
            "vocab_hash": self.vocab_hash,
        }

    def server_stats(self) -> dict[str, dict[str, int]]:
        """Per server: requests answered and failed, times taken out."""
        return {server.url: server.stats() for server in self.pool.servers}
