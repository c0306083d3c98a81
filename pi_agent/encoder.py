"""The encoder's model store and the server its switches restart and probe.

An encoder (a BERT-style embedding GGUF, such as the MiniLM that ``distill export`` writes with
a manifest of kind ``encoder``) is installed, activated and rolled back like the decoder, under
the same rules (``pi_agent.store``, ``pi_agent.switch``), in a store of its own::

    <state_dir>/models/encoder/versions/<version>/model.gguf
    <state_dir>/models/encoder/current -> versions/<version>

through ``/v1/encoder/models...``, the routes of ``/v1/models...`` (``pi_agent.models_api``).
The encoder's llama-server (``--embedding``) runs once a version is active, unless
``encoder.enabled`` is false or ``encoder.model`` names a file, and ``/v1/embeddings`` is then
served. A switch probes the new version with one embedding request: the answer must be a vector
of the model's size (``<arch>.embedding_length`` of its GGUF header), finite and not all zero.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from pi_agent.gguf import read_header
from pi_agent.store import ModelStore
from pi_agent.supervisor import Supervisor

ENCODER_PREFIX = "/v1/encoder/"
STORE_DIR = "encoder"  # under the decoder's store root: <state_dir>/models/encoder


class Agent(Protocol):
    """What the encoder server needs of :class:`pi_agent.app.Agent`."""

    cfg: dict[str, dict[str, Any]]
    encoder_store: ModelStore
    supervisors: dict[str, Supervisor]

    async def _sync_supervisors(
        self, force: bool = False, roles: tuple[str, ...] = ("decoder", "encoder")
    ) -> None: ...


def store_root(decoder_root: Path) -> Path:
    """Where the encoder's store lives, beside the decoder's versions."""
    return decoder_root / STORE_DIR


def serves_store(cfg: dict[str, dict[str, Any]]) -> bool:
    """Whether the encoder's llama-server runs on the encoder store's active version."""
    section = cfg["encoder"]
    return bool(section["enabled"]) and not section["model"]


class EncoderServer:
    """The encoder's llama-server as a switch restarts and probes it (a ``switch.Server``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def restart(self) -> str | None:
        """Start, restart or stop the encoder on the active version, then probe it."""
        if not serves_store(self.agent.cfg):
            return None  # nothing serves the store's encoder here: the switch is all there is
        await self.agent._sync_supervisors(force=True, roles=("encoder",))
        return None if self.agent.encoder_store.active() is None else await self.probe()

    async def probe(self) -> str | None:
        """One embedding request to the encoder serving the active version; ``None`` when the
        answer is a vector of the model's size."""
        sup = self.agent.supervisors.get("encoder")
        model = self.agent.encoder_store.active_model()
        if not serves_store(self.agent.cfg) or model is None:
            return None
        if sup is None:
            return "the encoder is not running"
        header = await asyncio.to_thread(read_header, model)
        store = self.agent.cfg["store"]
        return await sup.probe(
            store["probe_prompt"], 1, store["probe_timeout_s"], dims=header.embedding_length
        )
