"""Model switches: activate a version, probe it on the llama-server that serves the store (the
decoder's, or the encoder's: one ``Switcher`` each), roll back when the probe fails, and finish
at the next start a switch that a stop interrupted.

A switch writes ``pending-switch.json`` (the version it leaves, the one it activates, and the
``previous`` link before it) before it moves a link, and removes it only once the switch is
decided: the new version passed its probe, or the rollback is done. SIGTERM cancels the request
mid-switch like kill -9 cuts it: the marker stays, and ``finish_interrupted`` decides the switch
at the next start from the links as they are. Whatever the point of the stop, the agent then
serves a probed model: the new one only if it passes its probe, else the old one.

A rollback restores both links as they were before the switch, so ``previous`` is never the
version that failed: ``POST /v1/models/rollback`` (``/v1/encoder/models/rollback``) cannot bring
it back, and the version that was ``previous`` stays protected from pruning.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pi_agent.fsutil import atomic_write
from pi_agent.http import HTTPError
from pi_agent.store import ModelStore

log = logging.getLogger(__name__)

PENDING = "pending-switch.json"


class Server(Protocol):
    """What a switch needs of the llama-server serving the store's active model."""

    async def restart(self) -> str | None:
        """Restart on the active model and probe it: ``None`` when it answers (or when nothing
        serves the store's model), else why it failed."""

    async def probe(self) -> str | None:
        """Probe the running server, as ``restart`` does."""


@dataclass(frozen=True)
class Pending:
    """A switch under way, as its marker records it."""

    old: str | None  # the active version it leaves
    new: str  # the version it activates
    previous: str | None  # the previous link before it

    @classmethod
    def read(cls, path: Path, store: ModelStore) -> Pending:
        data = json.loads(path.read_text())
        # A marker from before "previous" was recorded: keep the link, unless it names the new one.
        return cls(data["from"], data["to"], data.get("previous", store.previous_version()))

    def write(self, path: Path) -> None:
        atomic_write(
            path, json.dumps({"from": self.old, "to": self.new, "previous": self.previous})
        )

    @property
    def previous_after_rollback(self) -> str | None:
        return None if self.previous == self.new else self.previous


class Switcher:
    """One switch at a time (``lock``, which deletes and prunes take too)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.lock = asyncio.Lock()

    async def switch(self, store: ModelStore, version: str) -> dict[str, Any]:
        """Make ``version`` active; 409 when its probe fails and the old one is back (or there is
        none), 503 when the old one fails its probe too."""
        if self.lock.locked():
            raise HTTPError(409, "another model switch is in progress")
        async with self.lock:
            store.check_allowed(store.manifest(version)["sha256"])
            old = store.active()
            if old == version:
                return {"active": version, "previous": old, "pruned": []}
            await asyncio.to_thread(store.verify, version)
            pending = Pending(old, version, store.previous_version())
            marker = store.root / PENDING
            await asyncio.to_thread(pending.write, marker)
            decided = False  # until then a stop (a cancelled request) leaves the marker
            try:
                await asyncio.to_thread(store.switch, version, False)
                failure = await self.server.restart()
                if failure is not None:
                    log.error(
                        "model %s failed its probe (%s); rolling back to %s", version, failure, old
                    )
                    status, message = await self._roll_back(store, pending, failure)
                    decided = True
                    raise HTTPError(status, message)
                decided = True
                removed = await asyncio.to_thread(store.prune)
            finally:
                if decided:
                    marker.unlink(missing_ok=True)
        return {"active": version, "previous": old, "pruned": removed}

    async def _roll_back(
        self, store: ModelStore, pending: Pending, failure: str
    ) -> tuple[int, str]:
        """Both links back as before ``pending``; the status and message that say how it ended."""
        await asyncio.to_thread(store.restore, pending.old, pending.previous_after_rollback)
        again = await self.server.restart()  # on the old model, or stopped when there is none
        said = f"model {pending.new} failed its readiness probe ({failure})"
        if pending.old is None:
            return 409, f"{said}; no model is active: it was the first to be activated"
        if again is not None:
            log.error("rolled back to %s, which fails its probe too (%s)", pending.old, again)
            return 503, (
                f"{said}; rolled back to {pending.old}, which fails its probe too ({again}): "
                "no model is serving"
            )
        return 409, f"{said}; rolled back to {pending.old}"

    async def finish_interrupted(self, store: ModelStore) -> None:
        """Decide a switch that a stop interrupted (at start, with the server started)."""
        marker = store.root / PENDING
        try:
            pending = Pending.read(marker, store)
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)
            return
        async with self.lock:
            active = store.active()
            if active == pending.new:
                failure = await self.server.probe()
                if failure is None:
                    log.info("interrupted switch to %s: it passes its probe, kept", active)
                    await asyncio.to_thread(store.restore, active, pending.old or pending.previous)
                else:
                    log.error("interrupted switch to %s: it fails its probe (%s)", active, failure)
                    _, message = await self._roll_back(store, pending, failure)
                    log.warning("interrupted switch: %s", message)
            elif active == pending.old:  # stopped before the link moved, or after the rollback
                await asyncio.to_thread(store.restore, active, pending.previous_after_rollback)
                failure = await self.server.probe()
                if failure is not None:
                    log.error(
                        "interrupted switch: %s is back and fails its probe (%s)", active, failure
                    )
            marker.unlink(missing_ok=True)
