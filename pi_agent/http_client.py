"""The HTTP/1.1 client the agent proxies to its llama-servers with, on 127.0.0.1 (plain HTTP:
loopback only, so no TLS): one request per connection, the body read or streamed once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


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
