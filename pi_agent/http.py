"""A small HTTP/1.1 server and client on asyncio streams: what the agent needs and no more.

A framework would cost the Pi memory it needs for the model (FastAPI + uvicorn measured 47 MB RSS
against this module's few hundred kB), and the agent needs little: keep-alive, ``Content-Length``
request bodies (JSON or a streamed upload), plain and chunked responses for SSE streaming, files
sent with ``sendfile`` (one byte range at most; over TLS, which sendfile cannot encrypt,
``loop.sendfile`` reads and writes the file in 256 KiB blocks instead, reading in a worker thread),
and a client that proxies to llama-server (``http_client``). The server speaks HTTPS when given an
``ssl.SSLContext`` (``pi_agent.tls``). Every failure answers a JSON error, never a traceback.

A flood must not take the agent down (issue 13): the server holds at most ``max_connections``,
making room by closing the connection that has waited longest for a request head (a fresh
``/healthz`` still gets in), gives a head ``head_timeout_s`` to arrive, lifts its soft open
files limit to the hard one, and answers running out of fds with one warning per 10 s instead
of asyncio's traceback per failed accept. Request heads are parsed in ``http_parse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

from pi_agent.http_listen import listen, raise_open_files_limit
from pi_agent.http_parse import MAX_HEADER_BYTES, Head, HeadError, parse_head

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # agent.max_connections: far below the unit's LimitNOFILE of 4,096
HEAD_TIMEOUT_S = 5.0  # agent.head_timeout_s: from accept, or from a head's first byte
KEEPALIVE_S = 75.0  # a kept-alive connection's wait for the next request's first byte
BODY_TIMEOUT_S = 60.0
LISTEN_BACKLOG = 1024  # room for a burst of connects: a fresh one is not left to SYN retries
ACCEPT_RETRY_S = 0.1  # after a failed accept: the listening socket stays readable meanwhile
ACCEPT_WARN_EVERY_S = 10.0
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
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


class ClientGone(ConnectionError):
    """The client reset or closed the connection while its request body was being read."""


class Request:
    """One parsed request; the body is read only when the handler asks for it."""

    def __init__(self, head: Head, reader: asyncio.StreamReader, peer: str) -> None:
        self.method = head.method
        parts = urlsplit(head.target)
        self.path = unquote(parts.path)
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.headers = head.headers
        self.peer = peer
        self._reader = reader
        self.content_length = head.content_length
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
            except ConnectionError as exc:  # not the handler's error to answer: nobody listens
                raise ClientGone(str(exc)) from None
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
    """Serves ``handler`` on a host and port, keep-alive included, with at most
    ``max_connections`` open connections; over TLS when ``ssl_context`` is set (a new context
    applies to the connections accepted after it)."""

    def __init__(
        self,
        handler: Handler,
        server_name: str = "pi-agent",
        max_connections: int = MAX_CONNECTIONS,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if not head_timeout_s > 0:
            raise ValueError(f"head_timeout_s must be positive, not {head_timeout_s}")
        self.handler = handler
        self.server_name = server_name
        self.max_connections = max_connections
        self.head_timeout_s = head_timeout_s
        self.ssl_context = ssl_context
        self._listeners: list[socket.socket] = []
        self._acceptors: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._evicted: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        # The connections waiting for a request head, longest waiting first: who makes room.
        self._waiting: dict[asyncio.Task[None], None] = {}
        self._accept_failures = 0
        self._warned_at = -math.inf

    @property
    def open_connections(self) -> int:
        """Connections being served or waiting for a request (not those being dropped)."""
        return len(self._connections) - len(self._evicted)

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port=0`` picks one)."""
        raise_open_files_limit()
        self._listeners = listen(host, port, LISTEN_BACKLOG)
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            task = loop.create_task(self._accept(sock), name=f"accept {sock.getsockname()}")
            self._acceptors.add(task)
        return self._listeners[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the open connections."""
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        self._acceptors.clear()
        for sock in self._listeners:
            sock.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        # asyncio's own accept loop answers EMFILE with a traceback for each of up to 100
        # accepts per wake-up, then retries them all a second later: 32k tracebacks in 16 s.
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except ConnectionAbortedError:  # the client gave up while queued
                continue
            except OSError as exc:
                self._accept_failed(exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if self.open_connections >= self.max_connections and not self._evict_idle():
                conn.close()  # every connection is busy with a request: this one waits its turn
                continue
            # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, not these:
            # without it a response's head and body meet the peer's delayed ACK (40 ms).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            task = loop.create_task(self._connection(conn, peer))
            self._connections.add(task)
            self._waiting[task] = None
            # A task cancelled before it ran never runs its finally: forget it here.
            task.add_done_callback(functools.partial(self._finished, conn))
            await asyncio.sleep(0)  # sock_accept never yields while a burst is queued

    def _finished(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._evicted.discard(task)
        self._waiting.pop(task, None)
        conn.close()  # a no-op once its transport closed it

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in OUT_OF_FDS:
            self._evict_idle()  # its fd goes to the next accept
        self._accept_failures += 1
        now = time.monotonic()
        if now - self._warned_at >= ACCEPT_WARN_EVERY_S:
            log.warning(
                "cannot accept connections: %s (failed %d times since the last warning)",
                exc,
                self._accept_failures,
            )
            self._warned_at, self._accept_failures = now, 0

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest for a request head (False: none)."""
        if not self._waiting:
            return False
        task = next(iter(self._waiting))
        del self._waiting[task]
        self._evicted.add(task)
        task.cancel()
        return True

    async def _connection(self, conn: socket.socket, peer: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await self._open(conn)
            first = True
            while await self._one(reader, writer, peer, first, task):
                first = False
        except (ConnectionError, ssl.SSLError) as exc:  # a reset, a failed handshake...
            log.debug("connection from %s closed: %s", peer, exc)  # ...the client's doing
        except (asyncio.IncompleteReadError, TimeoutError, asyncio.CancelledError):
            pass  # the client went away, was dropped to make room, or the server is closing
        except OSError as exc:  # a file being sent failed mid-way: only closing is left
            log.warning("connection from %s dropped: %s", peer, exc)
        finally:
            if writer is None:
                conn.close()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await writer.wait_closed()

    async def _open(self, conn: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams on an accepted socket, after the TLS handshake (within ``head_timeout_s``)
        when the server speaks TLS."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(MAX_HEADER_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        context = self.ssl_context
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol,
            conn,
            ssl=context,
            ssl_handshake_timeout=self.head_timeout_s if context is not None else None,
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _read_head(self, reader: asyncio.StreamReader, first: bool) -> Head | None:
        """The next request head; ``None`` when the client closed or stayed quiet too long.

        A new connection has ``head_timeout_s`` for its whole head. A kept-alive one may stay
        quiet for ``KEEPALIVE_S``, then has ``head_timeout_s`` from its next head's first byte.
        """
        start = b""
        try:
            if not first:
                start = await asyncio.wait_for(reader.readexactly(1), KEEPALIVE_S)
            raw = start + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout_s)
        except asyncio.LimitOverrunError:
            raise HeadError(431, "request headers too large") from None
        except asyncio.IncompleteReadError as exc:
            if (start + exc.partial).strip():
                raise HeadError(400, "incomplete request") from None
            return None
        except TimeoutError:
            return None
        return parse_head(raw)

    async def _one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        first: bool,
        task: asyncio.Task[None],
    ) -> bool:
        self._waiting[task] = None  # last in line to make room
        try:
            head = await self._read_head(reader, first)
        except HeadError as exc:  # framing in doubt: answer, then close
            response = Response(exc.status, error_body(exc.status, exc.message))
            await self._send(writer, response, False, None)
            return False
        finally:
            self._waiting.pop(task, None)
        if head is None:
            return False
        request = Request(head, reader, peer)
        try:
            response = await self.handler(request)
        except HTTPError as exc:
            response = Response(
                exc.status, error_body(exc.status, exc.message), headers=exc.headers
            )
        except (asyncio.CancelledError, ClientGone):
            raise
        except Exception:
            log.exception("unhandled error")
            response = Response(500, error_body(500, "internal error"))
        # An unread body would be parsed as the next request.
        keep_alive = head.keep_alive and request.consumed
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
            # Head and body in one write, so one send: an agent killed mid-response leaves its
            # client (or the gateway, which cannot retry a response it has begun to forward)
            # with the whole answer or nothing, never headers alone.
            body = b"" if head_only else response.body
            writer.write(_head(response.status, headers) + body)
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
                try:  # over TLS, loop.sendfile falls back to reads and writes of 256 KiB
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
