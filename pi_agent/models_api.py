"""The agent's model routes: list, read, install (upload, URL, incoming folder), delete,
activate and roll back versions, and serve their blobs to the other Pis.

``/v1/models...`` acts on the decoder's store, ``/v1/encoder/models...`` on the encoder's
(``pi_agent.encoder``): the same handlers, each store with its own switcher.

A mixin of :class:`pi_agent.app.Agent`, which holds the stores, the switchers and the
configuration these handlers use; a switch itself is :mod:`pi_agent.switch`'s.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from pi_agent.encoder import ENCODER_PREFIX
from pi_agent.http import FileResponse, HTTPError, Request, Response, byte_range
from pi_agent.install import install_upload
from pi_agent.store import SHA256_RE, ModelStore, StoreError
from pi_agent.switch import Switcher

# /v1/models/<version>[/activate] and /v1/encoder/models/<version>[/activate]
VERSION_PATH = re.compile(r"^/v1/(?:encoder/)?models/([^/]+)(/activate)?$")
BLOB_PATH = re.compile(r"^/v1/blobs/([^/]*)$")


class ModelRoutes:
    """``/v1/models...``, ``/v1/encoder/models...`` and ``/v1/blobs/<sha256>``."""

    # Set by Agent: the stores and their switchers, the config, blob counters, the client TLS
    # context.
    store: ModelStore
    switcher: Switcher
    encoder_store: ModelStore
    encoder_switcher: Switcher
    cfg: Any
    blob_stats: Any
    client_tls: Any

    async def _body(self, request: Request, schema: str, required: bool = True) -> dict[str, Any]:
        raise NotImplementedError  # Agent's

    def _target(self, request: Request) -> tuple[ModelStore, Switcher]:
        """The store and the switcher a request is for: the encoder's or the decoder's."""
        if request.path.startswith(ENCODER_PREFIX):
            return self.encoder_store, self.encoder_switcher
        return self.store, self.switcher

    def _model_entry(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": manifest["version"],
            "object": "model",
            "created": int(manifest.get("installed_at", 0)),
            "owned_by": "pi-agent",
            **{k: manifest[k] for k in ("version", "name", "sha256", "size")},
            "active": bool(manifest.get("active")),
            "previous": bool(manifest.get("previous")),
        }

    async def list_models(self, request: Request) -> Response:
        """Installed versions, in OpenAI's list shape."""
        store, _ = self._target(request)
        return Response.json(
            {"object": "list", "data": [self._model_entry(m) for m in store.list()]}
        )

    async def get_model(self, request: Request) -> Response:
        """One version's manifest."""
        version = VERSION_PATH.match(request.path).group(1)  # type: ignore[union-attr]
        store, _ = self._target(request)
        manifest = store.manifest(version)
        manifest["active"] = version == store.active()
        manifest["previous"] = version == store.previous_version()
        return Response.json(self._model_entry(manifest))

    async def install(self, request: Request) -> Response:
        """Install from a URL or a file in the incoming folder (verified by sha256), optionally
        activating it."""
        body = await self._body(request, "InstallRequest")
        store, _ = self._target(request)
        if "path" in body:
            manifest = await asyncio.to_thread(
                store.install_path,
                body["version"],
                body["path"],
                body["sha256"],
                body.get("name", ""),
            )
        else:
            manifest = await self._install_url(store, body)
        if body.get("activate"):
            return await self._switch(request, body["version"], created=True)
        return Response.json(manifest, 201)

    async def _install_url(self, store: ModelStore, body: dict[str, Any]) -> dict[str, Any]:
        from pi_agent.download import install_url  # urllib.request: only when needed

        try:
            return await asyncio.to_thread(
                install_url,
                store,
                body["version"],
                body["url"],
                body["sha256"],
                body.get("name", ""),
                self.cfg["store"]["download_timeout_s"],
                self.client_tls,
            )
        except StoreError as exc:
            if exc.status == 502:  # an unreachable URL is the caller's to fix
                raise StoreError(str(exc), 422) from None
            raise

    async def get_blob(self, request: Request) -> FileResponse:
        """The GGUF of an installed version by its sha256, whole or one byte range."""
        sha256 = BLOB_PATH.match(request.path).group(1)  # type: ignore[union-attr]
        if not SHA256_RE.fullmatch(sha256):
            raise HTTPError(400, "a blob is named by its sha256: 64 lowercase hex digits")
        handle = await asyncio.to_thread(self.store.open_blob, sha256)
        size = os.fstat(handle.fileno()).st_size
        ranged = request.method == "GET"  # RFC 9110: Range is defined for GET only
        try:
            span = byte_range(request.headers.get("range") if ranged else None, size)
        except HTTPError:
            handle.close()
            raise
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
        first, last = span if span is not None else (0, size - 1)
        if span is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"

        def count(sent: int) -> None:
            self.blob_stats.bytes_served += sent

        return FileResponse(
            handle, first, last - first + 1, 206 if span else 200, headers=headers, on_sent=count
        )

    async def upload(self, request: Request) -> Response:
        """Install the request body (raw GGUF) as a version, verified by sha256."""
        version = VERSION_PATH.match(request.path).group(1)  # type: ignore[union-attr]
        if "content-length" not in request.headers:
            raise HTTPError(411, "an upload needs Content-Length")
        limit = self.cfg["agent"]["max_upload_bytes"]
        if request.content_length > limit:
            raise HTTPError(413, f"upload larger than {limit} bytes")
        manifest = await install_upload(
            self._target(request)[0],
            request,
            version,
            request.query.get("sha256", ""),
            request.query.get("name", ""),
            self.cfg["agent"]["upload_deadline_s"],
        )
        return Response.json(manifest, 201)

    async def delete_model(self, request: Request) -> Response:
        """Delete a version that is neither active nor previous."""
        version = VERSION_PATH.match(request.path).group(1)  # type: ignore[union-attr]
        store, switcher = self._target(request)
        async with switcher.lock:
            await asyncio.to_thread(store.remove, version)
        return Response.json({"deleted": version})

    async def activate(self, request: Request) -> Response:
        """Switch to a version, probe it, roll back if the probe fails."""
        version = VERSION_PATH.match(request.path).group(1)  # type: ignore[union-attr]
        return await self._switch(request, version)

    async def rollback(self, request: Request) -> Response:
        """Switch back to the previous version."""
        previous = self._target(request)[0].previous_version()
        if previous is None:
            raise HTTPError(409, "no previous model version to roll back to")
        return await self._switch(request, previous)

    async def _switch(self, request: Request, version: str, created: bool = False) -> Response:
        store, switcher = self._target(request)
        done = await switcher.switch(store, version)
        done["sha256"] = store.manifest(version)["sha256"]
        return Response.json(done, 201 if created else 200)
