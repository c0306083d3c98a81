"""The OpenAI-compatible teacher: llama-server, vLLM, ollama, several requests at a time.

``requires_json`` rows carry ``response_format: {"type": "json_schema", ...}``; a server that
refuses it (HTTP 4xx) is warned about once and the run goes on with validate-and-retry.
``--logprobs K`` asks for ``logprobs``/``top_logprobs`` on the chat endpoint and keeps them by
token id, so the server must report ids (llama-server does). The vocabulary's hash comes from
``--teacher-tokenizer`` when given (a server does not tell it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distill.label.args import Answer, Generation, LabelArgs, LabelError
from distill.records import Record, build_messages, render_prompt

log = logging.getLogger(__name__)


class _Refused(Exception):
    """The server answered 4xx: the request itself is wrong, retrying it unchanged won't help."""


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
        self.constrain_json = args.constrain_json
        self.k = args.logprobs
        if self.k and self.style != "chat":
            raise LabelError("--logprobs with --teacher-url needs the chat style (token ids)")
        # Servers that refuse response_format fall back to validate-and-retry, once warned.
        self.schema_refused = False
        self.vocab_hash = _tokenizer_hash(args.teacher_tokenizer)
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
        """POST with retries; a server that refuses ``response_format`` is asked again without."""
        if "response_format" in payload and not self.schema_refused:
            try:
                return self._send(path, payload)
            except _Refused as refused:
                self.schema_refused = True
                log.warning(
                    "teacher server %s refused response_format (%s): JSON rows fall back to "
                    "validate-and-retry",
                    self.base,
                    refused,
                )
        payload = {k: v for k, v in payload.items() if k != "response_format"}
        try:
            return self._send(path, payload)
        except _Refused as refused:
            raise LabelError(f"teacher server {self.base}{path}: {refused}") from None

    def _send(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
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
                    raise _Refused(problem)
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
            data = self._post("/chat/completions", payload)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        else:
            payload["prompt"] = render_prompt(record, "plain")
            data = self._post("/completions", payload)
            choice = data["choices"][0]
            text = choice.get("text") or ""
        usage = data.get("usage") or {}
        reason = choice.get("finish_reason")
        finished = None if reason is None else reason != "length"
        logprobs = self._logprobs(record, choice) if self.k else None
        return Answer(text.strip(), int(usage.get("completion_tokens") or 0), finished, logprobs)

    def _logprobs(self, record: Record, choice: dict[str, Any]) -> Any:
        """The server's top-K per answer token, as ids (llama-server gives ``id``; vLLM gives
        ``token_id:N`` tokens with ``--return-tokens-as-token-ids``)."""
        import numpy as np

        from distill.logprobs import TokenLogprobs

        content = ((choice.get("logprobs") or {}).get("content")) or []
        ids, top_ids, top_lp = [], [], []
        for entry in content:
            ids.append(_token_id(entry, self.base))
            top = sorted(entry.get("top_logprobs") or [], key=lambda c: -c["logprob"])[: self.k]
            if len(top) < self.k:
                raise LabelError(
                    f"{record.where}: teacher server {self.base} returned {len(top)} top "
                    f"logprobs, {self.k} asked"
                )
            top_ids.append([_token_id(c, self.base) for c in top])
            top_lp.append([max(float(c["logprob"]), -1e4) for c in top])
        shape = (len(ids), self.k)
        return TokenLogprobs(
            np.asarray(ids, dtype=np.int32),
            np.asarray(top_ids, dtype=np.int32).reshape(shape),
            np.asarray(top_lp, dtype=np.float32).reshape(shape),
        )

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
            "vocab_hash": self.vocab_hash,
        }
