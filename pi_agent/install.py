"""Uploads into the model store with the event loop kept free.

The body of ``PUT /v1/models/<version>`` is gathered into 1 MiB blocks, and each block is written
and hashed by a worker thread while the loop reads the next: a card that stalls on writeback (or
a frozen file system) holds the upload, never /healthz or the completions of other clients.
An upload ends within ``agent.upload_deadline_s`` (408 after it). Every way out of an upload, a
stop included, either commits the version or drops it with its lock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pi_agent.http import HTTPError, Request
from pi_agent.store import Incoming, ModelStore

log = logging.getLogger(__name__)

WRITE_BLOCK = 1 << 20  # bytes handed to a worker thread at a time
UPLOAD_DEADLINE_S = 3600.0  # a whole upload, from its head to the commit


async def install_upload(
    store: ModelStore,
    request: Request,
    version: str,
    sha256: str,
    name: str,
    deadline: float = UPLOAD_DEADLINE_S,
) -> dict[str, Any]:
    """Install the request's body as ``version``; the manifest."""
    try:
        async with asyncio.timeout(deadline):
            incoming = await _begin(store, version, sha256, name, request.content_length, deadline)
            try:
                await _receive(request, incoming)
                return await asyncio.to_thread(incoming.commit)
            except BaseException:
                await asyncio.to_thread(incoming.abort)  # after the write under way, if any
                raise
    except TimeoutError:
        raise HTTPError(408, f"the upload did not finish within {deadline:g} s") from None


async def _begin(
    store: ModelStore, version: str, sha256: str, name: str, size: int, wait: float
) -> Incoming:
    """``store.begin`` in a thread (it may wait for another install of the version); a version
    begun after the request was cancelled is dropped, its lock with it."""
    begun = asyncio.ensure_future(
        asyncio.to_thread(store.begin, version, sha256, name, size, "upload", wait)
    )
    try:
        return await asyncio.shield(begun)
    except asyncio.CancelledError:
        begun.add_done_callback(_drop_orphan)
        raise


def _drop_orphan(begun: asyncio.Future[Incoming]) -> None:
    if not begun.cancelled() and begun.exception() is None:
        begun.result().abort()


async def _receive(request: Request, incoming: Incoming) -> None:
    """The body into ``incoming``, one block written while the next is read."""
    writing: asyncio.Future[None] | None = None
    block = bytearray()
    async for chunk in request.stream():
        block += chunk
        if len(block) < WRITE_BLOCK:
            continue
        if writing is not None:
            await writing
        writing = asyncio.ensure_future(asyncio.to_thread(incoming.write, bytes(block)))
        writing.add_done_callback(_retrieve)  # its error is raised by the await, if any comes
        block.clear()
    if writing is not None:
        await writing
    if block:
        await asyncio.to_thread(incoming.write, bytes(block))


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # marks it retrieved: an upload that ended otherwise drops the version
