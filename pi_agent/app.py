"""The agent: HTTP API, llama-server supervision, model store, metrics and benchmarks together.

``Agent.handle`` is the whole API (its routes are listed in ``pi_agent.openapi``). Completions and
embeddings are proxied to the supervised llama-servers on 127.0.0.1, server-sent events chunk by
chunk. A model switch probes the new model with a real prompt and rolls back by itself when the
probe fails; a switch interrupted by a kill is finished (probed, kept or rolled back) at the next
start. The encoder (embeddings) has a store and a switcher of its own under the same rules, at
``/v1/encoder/models...`` (``pi_agent.encoder``). ``/v1/blobs/<sha256>`` serves installed GGUFs
to the other Pis (byte ranges, sendfile), to the agent's token or the fleet's peer token, which
opens nothing else. The fleet's service token (the gateway's, Prometheus's) opens inference and
reads (``SERVICE_ROUTES``), never a model change, a benchmark or a blob. The API is served over
HTTPS when the config names a certificate (``pi_agent.tls``), and with ``store.allowlist_file``
only the listed sha256s are installed and activated (``pi_agent.allowlist``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pi_agent import __version__, http, metrics, sdnotify, structured, tls
from pi_agent.allowlist import Allowlist
from pi_agent.config import Config, Tokens
from pi_agent.encoder import EncoderServer, store_root
from pi_agent.gguf import expect_kind
from pi_agent.host import Host, decode_throttled
from pi_agent.http import (
    AnyResponse,
    HTTPError,
    Request,
    Response,
    StreamResponse,
)
from pi_agent.models_api import BLOB_PATH, VERSION_PATH, ModelRoutes
from pi_agent.openapi import SCHEMAS, ValidationError, document, validate
from pi_agent.store import ModelStore, StoreError
from pi_agent.supervisor import Supervisor
from pi_agent.switch import PENDING, Switcher

log = logging.getLogger(__name__)

# How llama-server's errors about a schema or a grammar begin or read (tools/server at 0c1e570).
_CONSTRAINT_ERROR = re.compile(r"json[_ ]schema|grammar", re.IGNORECASE)
Route = Callable[[Request], Awaitable[AnyResponse]]
# What the fleet's service token may do: serve (the gateway) and be watched (Prometheus).
SERVICE_ROUTES = frozenset({
    ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/v1/status"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"), ("GET", "/v1/encoder/models"),
})  # fmt: skip


class Agent(ModelRoutes):
    """One pi-agent; ``start`` it, ``serve_forever`` until ``stop``."""

    def __init__(
        self,
        cfg: Config,
        tokens: Tokens,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._set_tokens(tokens)
        self.blob_stats = metrics.BlobStats()
        self.started = time.time()
        self.server = http.Server(
            self.handle,
            max_connections=cfg["agent"]["max_connections"],
            head_timeout_s=cfg["agent"]["head_timeout_s"],
            ssl_context=tls_context,
        )
        self.port = 0
        self._bench_lock = asyncio.Lock()
        self.switcher = Switcher(self)
        self.encoder_switcher = Switcher(EncoderServer(self))
        self._ready_cache: tuple[float, bool] = (0.0, False)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self.llama_version = ""
        self.supervisors: dict[str, Supervisor] = {}
        self.configure(cfg)

    # configuration

    def configure(self, cfg: Config) -> None:
        """Apply a configuration (at start and on SIGHUP) except the listen address and the
        server's certificate (``reload`` takes those)."""
        self.client_tls = tls.client_context(cfg)  # first: a ConfigError leaves the agent as it was
        self.cfg = cfg
        agent = cfg["agent"]
        self.state_dir = Path(agent["state_dir"])
        self.host = Host(Path(agent["root"]))
        store = cfg["store"]
        listed = Allowlist(store["allowlist_file"]) if store["allowlist_file"] else None

        def model_store(root: Path, kind: str, other_route: str) -> ModelStore:
            return ModelStore(
                root,
                store["keep_versions"],
                int(store["free_space_margin_mib"] * (1 << 20)),
                Path(store["incoming_dir"] or self.state_dir / "incoming"),
                admit=listed.check if listed is not None else None,
                inspect=expect_kind(kind, other_route),
            )

        self.store = model_store(self.state_dir / "models", "decoder", "/v1/encoder/models")
        self.encoder_store = model_store(store_root(self.store.root), "encoder", "/v1/models")
        self.bin_dir = Path(cfg["llama"]["bin_dir"])
        sources = {
            "thermal": lambda: metrics.ThermalCollector(self.host),
            "throttling": lambda: metrics.ThrottlingCollector(
                self.host, cfg["metrics"]["vcgencmd"]
            ),
            "memory": lambda: metrics.MemoryCollector(self.host),
            "zram": lambda: metrics.ZramCollector(self.host),
            "cpu": lambda: metrics.CpuCollector(self.host),
            "llama_server": lambda: metrics.LlamaServerCollector(lambda: self.supervisors),
            "bench": lambda: metrics.BenchCollector(self.state_dir),
            "blobs": lambda: metrics.BlobCollector(self.blob_stats),
            "disk": lambda: metrics.DiskCollector(self.state_dir),
        }
        self.registry = metrics.Registry(
            [sources[name]() for name in cfg["metrics"]["collectors"]], self.host
        )

    def _model_for(self, role: str) -> Path | None:
        explicit = self.cfg[role]["model"]
        if explicit:
            return Path(explicit)
        return (self.store if role == "decoder" else self.encoder_store).active_model()

    async def _sync_supervisors(
        self, force: bool = False, roles: tuple[str, ...] = ("decoder", "encoder")
    ) -> None:
        for role in roles:
            section = self.cfg[role]
            sup = self.supervisors.get(role)
            model = self._model_for(role)
            # An encoder runs only with a model: a Pi without one is ready on its decoder alone.
            if not section["enabled"] or (role == "encoder" and model is None):
                if sup is not None:
                    await sup.stop()
                    del self.supervisors[role]
                continue
            if sup is None:
                sup = self.supervisors[role] = Supervisor(
                    role,
                    self.bin_dir / "llama-server",
                    section,
                    self.cfg["llama"],
                    self.state_dir / "logs",
                )
                sup.start(model)
            elif force or sup.section != section or sup.llama != self.cfg["llama"]:
                sup.llama = self.cfg["llama"]
                sup.binary = self.bin_dir / "llama-server"
                await sup.restart(model, section)

    async def reload(
        self,
        cfg: Config,
        tokens: Tokens,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """SIGHUP: the new config, tokens and certificate (for the connections accepted from
        now on); llama-servers restart only if their settings moved."""
        old = self.cfg["agent"]
        if (cfg["agent"]["listen"], cfg["agent"]["port"]) != (old["listen"], old["port"]):
            log.warning("agent.listen and agent.port change only at restart")
        self._set_tokens(tokens)
        self.configure(cfg)
        self.server.ssl_context = tls_context
        await asyncio.to_thread(self.store.make_incoming_dir)
        logging.getLogger().setLevel(cfg["agent"]["log_level"].upper())
        await self._sync_supervisors()
        log.info("configuration reloaded")

    # life cycle

    async def start(self) -> int:
        """Recover the store, start llama-servers, listen; returns the bound port."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.recover)
        await asyncio.to_thread(self.encoder_store.recover)
        self._spawn(self._llama_version())
        await self._sync_supervisors()
        for store, switcher in (
            (self.store, self.switcher),
            (self.encoder_store, self.encoder_switcher),
        ):
            if (store.root / PENDING).is_file():
                self._spawn(switcher.finish_interrupted(store))
        agent = self.cfg["agent"]
        self.port = await self.server.start(agent["listen"], agent["port"])
        scheme = "https" if self.server.ssl_context is not None else "http"
        log.info(
            "pi-agent %s listening on %s://%s:%d", __version__, scheme, agent["listen"], self.port
        )
        sdnotify.notify(f"READY=1\nSTATUS=serving on port {self.port}\nMAINPID={os.getpid()}")
        interval = sdnotify.watchdog_interval()
        if interval and agent["watchdog"]:
            self._spawn(self._watchdog(interval))
        return self.port

    async def stop(self) -> None:
        """Stop serving and stop the llama-servers (SIGTERM)."""
        sdnotify.notify("STOPPING=1")
        await self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Until ``stop`` has finished."""
        await self._stopped.wait()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _llama_version(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                str(self.bin_dir / "llama-server"), "--version",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
            self.llama_version = out.decode(errors="replace").strip().splitlines()[0]
        except (OSError, TimeoutError, IndexError):
            self.llama_version = ""

    # the API

    async def handle(self, request: Request) -> AnyResponse:
        """Route one request (authentication first, except for /healthz)."""
        started = time.perf_counter()
        blob = request.path.startswith("/v1/blobs/")
        try:
            response = await self._route(request)
        except HTTPError as exc:
            if blob:
                self.blob_stats.requests[exc.status] += 1
            raise
        if blob:
            self.blob_stats.requests[response.status] += 1
        log.debug(
            "%s %s %s %d %.1f ms",
            request.peer,
            request.method,
            request.path,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    async def _route(self, request: Request) -> AnyResponse:
        path, method = request.path, request.method
        if path == "/healthz" and method in ("GET", "HEAD"):
            return Response.json({"status": "ok"})
        self._authenticate(request)
        routes: dict[str, dict[str, Route]] = {
            "/readyz": {"GET": self.readyz},
            "/metrics": {"GET": self.metrics},
            "/openapi.json": {"GET": self.openapi},
            "/v1/status": {"GET": self.status},
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/models": {"GET": self.list_models, "POST": self.install},
            "/v1/models/rollback": {"POST": self.rollback},
            "/v1/encoder/models": {"GET": self.list_models, "POST": self.install},
            "/v1/encoder/models/rollback": {"POST": self.rollback},
            "/v1/bench": {"GET": self.last_bench, "POST": self.run_bench},
            "/v1/bench/csv": {"GET": self.last_bench_csv},
        }
        table = routes.get(path)
        if table is None:
            match = VERSION_PATH.match(path)
            if match and match.group(2):
                table = {"POST": self.activate}
            elif match:
                table = {"GET": self.get_model, "PUT": self.upload, "DELETE": self.delete_model}
            elif BLOB_PATH.match(path):
                table = {"GET": self.get_blob, "HEAD": self.get_blob}
            else:
                raise HTTPError(404, f"no such endpoint: {path}")
        handler = table.get(method)
        if handler is None:
            raise HTTPError(
                405, f"{method} is not allowed on {path}", {"Allow": ", ".join(sorted(table))}
            )
        try:
            return await handler(request)
        except StoreError as exc:
            raise HTTPError(exc.status, str(exc)) from None

    def _set_tokens(self, tokens: Tokens) -> None:
        self.token = tokens.agent.encode()
        self.peer_token = tokens.peer.encode()
        self.service_token = tokens.service.encode()

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        secret = given.strip().encode("utf-8", "replace")
        if hmac.compare_digest(secret, self.token):
            return
        # The peer token, shared by the fleet, only reads blobs: it is refused like a wrong one
        # everywhere else.
        if (
            self.peer_token
            and BLOB_PATH.match(request.path)
            and hmac.compare_digest(secret, self.peer_token)
        ):
            return
        if (
            self.service_token
            and (request.method, request.path) in SERVICE_ROUTES
            and hmac.compare_digest(secret, self.service_token)
        ):
            return
        raise HTTPError(403, "invalid bearer token")

    async def _body(self, request: Request, schema: str, required: bool = True) -> dict[str, Any]:
        if not required and request.content_length == 0:
            return {}
        data = await request.json(self.cfg["agent"]["max_body_bytes"])
        try:
            validate(data, SCHEMAS[schema])
        except ValidationError as exc:
            raise HTTPError(400, str(exc)) from None
        return data

    async def readyz(self, request: Request) -> Response:
        """200 when every enabled llama-server is up and answering, and no switch is under way
        (one interrupted by a stop is finished first: its model is not probed yet)."""
        now = time.monotonic()
        checked, ready = self._ready_cache
        states = {role: sup.state for role, sup in self.supervisors.items()}
        if now - checked > 1.0:
            ready = (
                bool(self.supervisors)
                and all(await asyncio.gather(*(s.healthy() for s in self.supervisors.values())))
                and all(state == "ready" for state in states.values())
            )
            self._ready_cache = (now, ready)
        ready = ready and not any(s.lock.locked() for s in (self.switcher, self.encoder_switcher))
        body = {"ready": ready, "servers": states}
        return Response.json(body, 200 if ready else 503, {} if ready else {"Retry-After": "1"})

    async def metrics(self, request: Request) -> Response:
        """The Prometheus exposition."""
        text = await self.registry.render()
        return Response(200, text.encode(), metrics.CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document."""
        return Response.json(document())

    async def status(self, request: Request) -> Response:
        """Host, board, model, llama.cpp build, uptime, zram, temperature, throttling."""
        host = self.host

        def safe(read: Callable[[], Any]) -> Any:
            try:
                return read()
            except (OSError, ValueError):
                return None

        def active_model(store: ModelStore) -> dict[str, Any] | None:
            active = store.active()
            if active:
                with contextlib.suppress(StoreError):
                    manifest = store.manifest(active)
                    return {k: manifest.get(k) for k in ("name", "version", "sha256", "size")}
            return None

        throttled = await host.throttled_async(self.cfg["metrics"]["vcgencmd"])
        return Response.json({
            "agent": {"version": __version__, "uptime_s": round(time.time() - self.started, 3),
                      "pid": os.getpid()},
            "host": safe(host.hostname),
            "board": host.board(),
            "board_model": safe(host.board_model),
            "uptime_s": safe(host.uptime_seconds),
            "temperature_c": host.temperature(),
            "throttled": None if throttled is None else {
                "raw": hex(throttled[0]), "source": throttled[1], **decode_throttled(throttled[0])},
            "zram": safe(host.zram),
            "model": active_model(self.store),
            "encoder_model": active_model(self.encoder_store),
            "llama_cpp": {"build": self.cfg["llama"]["build"], "version": self.llama_version},
            "servers": {role: {"state": s.state, "restarts": s.restarts, "pid": s.pid,
                               "last_error": s.last_error}
                        for role, s in self.supervisors.items()},
        })  # fmt: skip

    # proxying

    async def _proxy(
        self, role: str, path: str, body: dict[str, Any], constrained: bool = False
    ) -> Response | StreamResponse:
        sup = self.supervisors.get(role)
        if sup is None:
            raise HTTPError(404, f"no {role} is configured on this Pi")
        if sup.state != "ready":
            raise HTTPError(503, f"the {role} is {sup.state}", {"Retry-After": "1"})
        try:
            upstream = await sup.call(
                "POST", path, json.dumps(body).encode(), self.cfg["agent"]["request_timeout_s"]
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            raise HTTPError(503, f"the {role} is not answering", {"Retry-After": "1"}) from None
        ctype = upstream.headers.get("content-type", "application/json")
        if upstream.status == 200 and ctype.startswith("text/event-stream"):
            return StreamResponse(upstream.chunks(), 200, "text/event-stream")
        try:
            data = await upstream.read()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            raise HTTPError(
                503, f"the {role} closed the connection", {"Retry-After": "1"}
            ) from None
        message = _upstream_message(data) if upstream.status >= 500 else ""
        if upstream.status == 500 and constrained and _CONSTRAINT_ERROR.search(message):
            # Some schemas and grammars llama-server cannot convert come back as a 500 (an
            # exception other than invalid_argument): the request's to fix, in its words. Other
            # 500s of a constrained request, such as its chat parser failing on the model's
            # output, are llama-server's and stay a 502.
            raise HTTPError(400, f"llama-server refused the constraint: {message}")
        if upstream.status >= 500:
            log.warning("%s answered %d: %s", role, upstream.status, data[:200])
            reason = f": {message}" if message else ""
            raise HTTPError(502, f"the {role} failed ({upstream.status}){reason}")
        return Response(upstream.status, data, ctype)

    async def _generate(self, request: Request, schema: str, path: str) -> AnyResponse:
        body = await self._body(request, schema)
        try:
            upstream, constrained = structured.for_llama_server(
                body, self.cfg["agent"]["max_constraint_bytes"]
            )
        except structured.ConstraintError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        return await self._proxy("decoder", path, upstream, constrained)

    async def chat(self, request: Request) -> AnyResponse:
        """OpenAI chat completion, optionally constrained by response_format or grammar."""
        return await self._generate(request, "ChatCompletionRequest", "/v1/chat/completions")

    async def completions(self, request: Request) -> AnyResponse:
        """OpenAI text completion, optionally constrained by response_format or grammar."""
        return await self._generate(request, "CompletionRequest", "/v1/completions")

    async def embeddings(self, request: Request) -> Response | StreamResponse:
        """OpenAI embeddings."""
        return await self._proxy(
            "encoder", "/v1/embeddings", await self._body(request, "EmbeddingRequest")
        )

    # the decoder, as a switch restarts and probes it (pi_agent.switch.Decoder)

    def _store_decoder(self) -> Supervisor | None:
        """The decoder when it serves the store's active model (not an explicit one)."""
        return None if self.cfg["decoder"]["model"] else self.supervisors.get("decoder")

    async def restart(self) -> str | None:
        """Restart the decoder on the active model and probe it (stopped when there is none)."""
        sup = self._store_decoder()
        if sup is None:
            return None  # nothing serves the store's model here: the switch is all there is
        model = self.store.active_model()
        await sup.restart(model)
        return None if model is None else await self.probe()

    async def probe(self) -> str | None:
        """Probe the decoder serving the active model; ``None`` when it answers."""
        sup = self._store_decoder()
        if sup is None or self.store.active() is None:
            return None
        store = self.cfg["store"]
        return await sup.probe(
            store["probe_prompt"], store["probe_max_tokens"], store["probe_timeout_s"]
        )

    # benchmarks

    async def run_bench(self, request: Request) -> Response:
        """Run llama-bench on the active model; 409 while another runs."""
        from pi_agent import bench

        body = await self._body(request, "BenchRequest", required=False)
        conf = self.cfg["bench"]
        try:
            params = bench.BenchParams(
                threads=tuple(body.get("threads", conf["threads"])),
                n_prompt=body.get("n_prompt", conf["n_prompt"]),
                n_gen=body.get("n_gen", conf["n_gen"]),
                repetitions=body.get("repetitions", conf["repetitions"]),
            )
        except bench.BenchError as exc:
            raise HTTPError(400, str(exc)) from None
        model = self._model_for("decoder")
        if model is None or not model.exists():
            raise HTTPError(409, "no active model to benchmark")
        if self._bench_lock.locked():
            raise HTTPError(409, "a benchmark is already running")
        async with self._bench_lock:
            active = self.store.active()
            sha = ""
            if active and not self.cfg["decoder"]["model"]:
                sha = self.store.manifest(active)["sha256"]
            history = sorted(Path(conf["history_dir"]).glob("*.csv")) if conf["history_dir"] else []
            try:
                summary = await asyncio.to_thread(
                    bench.run,
                    binary=self.bin_dir / "llama-bench",
                    model=model,
                    model_sha256=sha,
                    params=params,
                    host=self.host,
                    out_dir=self.state_dir / "bench",
                    vcgencmd=self.cfg["metrics"]["vcgencmd"],
                    build=self.cfg["llama"]["build"],
                    tolerance=body.get("tolerance", conf["tolerance"]),
                    history=history,
                    timeout=conf["timeout_s"],
                    expected=body.get("expected"),
                )
            except bench.BenchError as exc:
                raise HTTPError(422, str(exc)) from None
        return Response.json(summary)

    async def last_bench(self, request: Request) -> Response:
        """The last benchmark's summary."""
        path = self.state_dir / "bench" / "last.json"
        if not path.is_file():
            raise HTTPError(404, "no benchmark has run yet")
        return Response(200, path.read_bytes())

    async def last_bench_csv(self, request: Request) -> Response:
        """The last benchmark's CSV."""
        path = self.state_dir / "bench" / "last.json"
        if not path.is_file():
            raise HTTPError(404, "no benchmark has run yet")
        csv_path = Path(json.loads(path.read_text())["csv"])
        return Response(200, csv_path.read_bytes(), "text/csv; charset=utf-8")


def _upstream_message(data: bytes) -> str:
    """The ``error.message`` of llama-server's JSON error body ("" when there is none)."""
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return ""
    return " ".join(message.split())[:1000]
