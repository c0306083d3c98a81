"""A small HTTP/1.1 server and client on asyncio streams: what the agent needs and no more.

A framework would cost the Pi memory it needs for the model (FastAPI + uvicorn measured 47 MB RSS
against this module's few hundred kB), and the agent needs little: keep-alive, ``Content-Length``
request bodies (JSON or a streamed upload), plain and chunked responses for SSE streaming, files
sent with ``sendfile`` (one byte range at most), and a client that proxies to llama-server on
127.0.0.1. Every failure answers a JSON error, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
KEEPALIVE_S = 75.0
HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 60.0
SENDFILE_SLICE = 1 << 20  # a file goes out in slices of this size...
SENDFILE_STALL_S = 60.0  # ...each within this time, else the client is dropped


class _NotFinite(ValueError):
    """NaN, Infinity or a number beyond a double in a JSON body: no JSON peer can read them back."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def _constant(name: str) -> float:
    raise _NotFinite(name)


class HTTPError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` (OpenAI's shape)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_body(status: int, message: str) -> bytes:
    """The JSON body of an error answer."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status in (401, 403):
        kind = "authentication_error" if status == 401 else "permission_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


@dataclass
class Response:
    """A whole response held in memory (JSON, metrics, small files)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(data).encode(), "application/json", headers or {})


@dataclass
class StreamResponse:
    """A response sent chunk by chunk as ``chunks`` yields them (SSE)."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FileResponse:
    """``length`` bytes of an open file from ``offset``, sent by ``sendfile`` (never read into
    memory); the server closes ``file`` and calls ``on_sent`` with the bytes that went out."""

    file: BinaryIO
    offset: int
    length: int
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    on_sent: Callable[[int], None] | None = None


_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``(first, last)`` bytes a ``Range`` header asks of ``size`` bytes, inclusive.

    ``None`` means the whole file: no header, a header that does not parse (RFC 9110 says to
    ignore it), several ranges (answered whole: one range is all peers ask for) or an empty file.
    An unsatisfiable range raises the 416 with ``Content-Range: bytes */size``.
    """
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or size == 0:
        return None

    def number(digits: str) -> int:
        return int(digits) if len(digits) <= 18 else 1 << 62  # beyond any file, without int()'s cap

    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # bytes=-n: the last n bytes
        suffix = number(last)
        if suffix == 0:
            raise HTTPError(416, "empty suffix range", {"Content-Range": f"bytes */{size}"})
        return max(size - suffix, 0), size - 1
    start = number(first)
    if last and number(last) < start:
        return None  # invalid, so ignored
    if start >= size:
        raise HTTPError(
            416, f"range starts beyond the {size} bytes", {"Content-Range": f"bytes */{size}"}
        )
    return start, min(number(last), size - 1) if last else size - 1


class Request:
    """One parsed request; the body is read only when the handler asks for it."""

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        peer: str,
    ) -> None:
        self.method = method
        parts = urlsplit(target)
        self.path = unquote(parts.path)
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.headers = headers
        self.peer = peer
        self._reader = reader
        length = headers.get("content-length")
        if "transfer-encoding" in headers:
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        if length is not None and not (length.isdigit() and len(length) < 19):
            raise HTTPError(400, "bad Content-Length")
        self.content_length = int(length) if length is not None else 0
        self._remaining = self.content_length

    @property
    def consumed(self) -> bool:
        """Whether the whole body has been read (else the connection cannot be reused)."""
        return self._remaining == 0

    async def body(self, limit: int) -> bytes:
        """The whole body, refused with 413 beyond ``limit`` bytes."""
        if self.content_length > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes")
        chunks = [chunk async for chunk in self.stream()]
        return b"".join(chunks)

    async def json(self, limit: int) -> Any:
        """The body parsed as JSON (400 when it is not)."""
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype.lower() != "application/json":
            raise HTTPError(415, "the body must be application/json")
        raw = await self.body(limit)
        try:
            # Python reads NaN and Infinity (and 1e999 as infinity), then writes them back as
            # tokens llama-server cannot parse: refused here, where the client can be told.
            return json.loads(raw, parse_float=_finite, parse_constant=_constant)
        except _NotFinite as exc:
            raise HTTPError(400, f"the body holds {exc}: JSON numbers are finite") from None
        except (ValueError, RecursionError):
            raise HTTPError(400, "the body is not valid JSON") from None

    async def stream(self, size: int = 1 << 16) -> AsyncIterator[bytes]:
        """The body in chunks of at most ``size`` bytes (uploads go straight to disk)."""
        while self._remaining:
            try:
                chunk = await asyncio.wait_for(
                    self._reader.read(min(size, self._remaining)), BODY_TIMEOUT_S
                )
            except TimeoutError:
                raise HTTPError(408, "timed out reading the request body") from None
            if not chunk:
                raise HTTPError(400, "the request body ended early")
            self._remaining -= len(chunk)
            yield chunk


AnyResponse = Response | StreamResponse | FileResponse
Handler = Callable[[Request], Awaitable[AnyResponse]]


def _head(status: int, headers: dict[str, str]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Server:
    """Serves ``handler`` on a host and port, keep-alive included."""

    def __init__(self, handler: Handler, server_name: str = "pi-agent") -> None:
        self.handler = handler
        self.server_name = server_name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port=0`` picks one)."""
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=MAX_HEADER_BYTES, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the open connections."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            first = True
            while await self._one(reader, writer, peer_text, first):
                first = False
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.CancelledError):
            pass  # the client went away, or the server is closing
        except OSError as exc:  # a file being sent failed mid-way: only closing is left
            log.warning("connection from %s dropped: %s", peer_text, exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _read_head(
        self, reader: asyncio.StreamReader, first: bool
    ) -> tuple[str, str, str, dict[str, str]] | None:
        try:
            raw = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT_S if first else KEEPALIVE_S
            )
        except asyncio.LimitOverrunError:
            raise HTTPError(431, "request headers too large") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise HTTPError(400, "incomplete request") from None
            return None
        except TimeoutError:
            return None
        try:
            text = raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise HTTPError(400, "bad request encoding") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
            raise HTTPError(400, "bad request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
                raise HTTPError(400, "bad header line")
            headers[name.lower()] = value.strip()
            if len(headers) > MAX_HEADERS:
                raise HTTPError(431, "too many request headers")
        return method, target, version, headers

    async def _one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        first: bool,
    ) -> bool:
        request: Request | None = None
        keep_alive = False
        try:
            head = await self._read_head(reader, first)
            if head is None:
                return False
            method, target, version, headers = head
            connection = headers.get("connection", "").lower()
            keep_alive = (version == "HTTP/1.1" and connection != "close") or (
                connection == "keep-alive"
            )
            request = Request(method, target, headers, reader, peer)
            response = await self.handler(request)
        except HTTPError as exc:
            response = Response(
                exc.status, error_body(exc.status, exc.message), headers=exc.headers
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error")
            response = Response(500, error_body(500, "internal error"))
        if request is None or not request.consumed:
            keep_alive = False  # an unread body would be parsed as the next request
        await self._send(writer, response, keep_alive, request)
        return keep_alive

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: AnyResponse,
        keep_alive: bool,
        request: Request | None,
    ) -> None:
        headers = {
            "Server": self.server_name,
            "Content-Type": response.content_type,
            "Connection": "keep-alive" if keep_alive else "close",
            **response.headers,
        }
        head_only = request is not None and request.method == "HEAD"
        if isinstance(response, Response):
            headers["Content-Length"] = str(len(response.body))
            writer.write(_head(response.status, headers))
            if not head_only:
                writer.write(response.body)
            await writer.drain()
            return
        if isinstance(response, FileResponse):
            headers["Content-Length"] = str(response.length)
            await self._send_file(writer, response, _head(response.status, headers), head_only)
            return
        headers["Transfer-Encoding"] = "chunked"
        headers.setdefault("Cache-Control", "no-cache")
        writer.write(_head(response.status, headers))
        await writer.drain()
        try:
            async for chunk in response.chunks:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
        finally:
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _send_file(
        self, writer: asyncio.StreamWriter, response: FileResponse, head: bytes, head_only: bool
    ) -> None:
        file, start = response.file, response.offset
        try:
            file.seek(start)  # sendfile moves the position as it goes, even when it fails
            writer.write(head)
            await writer.drain()
            end = start + (0 if head_only else response.length)
            loop = asyncio.get_running_loop()
            while (offset := file.tell()) < end:
                count = min(SENDFILE_SLICE, end - offset)
                try:
                    sent = await asyncio.wait_for(
                        loop.sendfile(writer.transport, file, offset, count), SENDFILE_STALL_S
                    )
                except RuntimeError:  # sendfile's answer to a transport the client closed
                    if not writer.transport.is_closing():
                        raise
                    raise ConnectionResetError("the client went away") from None
                if sent < count:  # the file shrank under us: the announced length cannot be met
                    raise OSError(f"file ended {end - offset - sent} bytes early")
        finally:
            sent_total = max(file.tell() - start, 0)
            file.close()
            if response.on_sent is not None:
                response.on_sent(sent_total)


class ClientResponse:
    """A response from an upstream server; the body is read or streamed once."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, Content-Length or until the connection closes)."""
        reader = self._reader
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                    yield data
            elif "content-length" in self.headers:
                remaining = int(self.headers["content-length"])
                while remaining:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise ConnectionError("upstream closed early")
                    remaining -= len(data)
                    yield data
            else:
                while data := await reader.read(1 << 16):
                    yield data
        finally:
            self.close()

    async def read(self, limit: int = 64 << 20) -> bytes:
        """The whole body."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > limit:
                raise ConnectionError("upstream response too large")
        return bytes(out)

    async def json(self) -> Any:
        """The whole body parsed as JSON."""
        return json.loads(await self.read())

    def close(self) -> None:
        """Drop the connection."""
        self._writer.close()


async def request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> ClientResponse:
    """Send one request (``Connection: close``) and read the response head within ``timeout``."""

    async def go() -> ClientResponse:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            all_headers = {"Host": f"{host}:{port}", "Connection": "close", **(headers or {})}
            if body is not None:
                all_headers["Content-Length"] = str(len(body))
            lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in all_headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
            await writer.drain()
            raw = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            parsed = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    parsed[name.strip().lower()] = value.strip()
            return ClientResponse(status, parsed, reader, writer)
        except BaseException:
            writer.close()
            raise

    return await asyncio.wait_for(go(), timeout)
