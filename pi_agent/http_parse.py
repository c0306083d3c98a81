"""Parsing a request head: the request line and the headers, held to RFC 9112's framing rules.

A head that could be read two ways is refused, never guessed at: two ``Content-Length`` fields
(a second request could hide in the body), ``Transfer-Encoding`` (the server reads no chunked
bodies) and control characters are each a 400 after which the connection closes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
MAX_CONTENT_LENGTH_DIGITS = 18  # beyond any body, within int()'s default digit cap

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_METHOD = re.compile(r"[A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also takes "²", which int() then refuses
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but HTAB
_TARGET_BAD = re.compile(r"[\x00-\x20\x7f]")
# Headers that mean one thing only once: a second copy is an attempt to be read two ways.
SINGLE = frozenset({"content-length", "transfer-encoding", "host", "authorization"})


class HeadError(Exception):
    """A request head that cannot be served: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Head:
    """A parsed request head; header names are lower-case."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    content_length: int

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept (HTTP/1.1 unless ``close``)."""
        connection = self.headers.get("connection", "").lower()
        return (self.version == "HTTP/1.1" and connection != "close") or connection == "keep-alive"


def parse_head(raw: bytes) -> Head:
    """The head in ``raw`` (the bytes up to and including the blank line)."""
    lines = raw.decode("latin-1").split("\r\n")  # latin-1 decodes every byte
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or not parts[1].startswith("/"):
        raise HeadError(400, "bad request line")
    method, target, version = parts
    if _TARGET_BAD.search(target):
        raise HeadError(400, "bad request target")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HeadError(400, "bad header line")
        if _CONTROL.search(value):
            raise HeadError(400, f"a control character in the {name} header")
        key = name.lower()
        if key in headers and key in SINGLE:
            raise HeadError(400, f"more than one {name} header")
        headers[key] = value.strip(" \t")
        if len(headers) > MAX_HEADERS:
            raise HeadError(431, "too many request headers")
    return Head(method, target, version, headers, _content_length(headers))


def _content_length(headers: dict[str, str]) -> int:
    length = headers.get("content-length")
    if "transfer-encoding" in headers:
        if length is not None:
            raise HeadError(400, "Transfer-Encoding and Content-Length exclude each other")
        raise HeadError(411, "chunked request bodies are not supported; send Content-Length")
    if length is None:
        return 0
    if not _DIGITS.fullmatch(length) or len(length) > MAX_CONTENT_LENGTH_DIGITS:
        raise HeadError(400, "bad Content-Length")
    return int(length)
