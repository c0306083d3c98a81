"""``pi-agent``: serve, benchmark, check the configuration.

    pi-agent serve --config /etc/pi-agent/agent.toml
    pi-agent serve --config agent.toml --port 0 --set decoder.threads=2   # flags override files
    pi-agent bench --config /etc/pi-agent/agent.toml --tolerance 0.2     # exit 1: gate failed
    pi-agent check-config --config /etc/pi-agent/agent.toml

Bad configuration: one line on stderr and exit 2 (a traceback only with ``--debug``): a token,
a certificate or an allowlist that does not read, or plain HTTP off loopback without
``agent.allow_plain_http``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from pathlib import Path

from pi_agent import __version__, tls
from pi_agent.allowlist import Allowlist
from pi_agent.config import Config, ConfigError, Tokens, load, read_tokens

log = logging.getLogger("pi_agent")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file over the packaged defaults (default: "
        "/etc/pi-agent/agent.toml when it exists)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (repeatable)",
    )
    parser.add_argument("--state-dir", help="agent.state_dir")
    parser.add_argument("--root", help="agent.root: read /proc and /sys under this directory")
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")


def _expectation(text: str) -> dict[str, float]:
    """``tg=30,pp=100`` -> ``{"tg": 30.0, "pp": 100.0}``; argparse shows what is wrong."""
    out: dict[str, float] = {}
    for item in text.split(","):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in ("pp", "tg"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected pp=TOK_S or tg=TOK_S")
        try:
            out[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a number") from None
        if not out[kind] > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: tokens/s must be above 0")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="pi-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pi-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent")
    _common(serve)
    serve.add_argument("--listen", help="agent.listen")
    serve.add_argument("--port", type=int, help="agent.port (0: any free port)")
    serve.add_argument("--token-file", help="agent.token_file")
    bench = sub.add_parser("bench", help="run llama-bench and the throughput gate")
    _common(bench)
    bench.add_argument("--model", type=Path, help="GGUF to benchmark (default: the active one)")
    bench.add_argument("--threads", help="comma-separated thread counts (bench.threads)")
    bench.add_argument("--n-prompt", type=int, help="bench.n_prompt")
    bench.add_argument("--n-gen", type=int, help="bench.n_gen")
    bench.add_argument("--repetitions", type=int, help="bench.repetitions")
    bench.add_argument("--tolerance", type=float, help="bench.tolerance")
    bench.add_argument(
        "--history",
        type=Path,
        action="append",
        default=[],
        help="a directory of fleet benchmark CSVs (repeatable)",
    )
    bench.add_argument("--board", help="board id for the regressor (default: from the device tree)")
    bench.add_argument(
        "--expect",
        type=_expectation,
        default={},
        metavar="KIND=TOK_S[,...]",
        help="tokens/s the gate expects, e.g. tg=30,pp=100 (instead of the regressor's)",
    )
    check = sub.add_parser("check-config", help="validate the configuration and print it")
    _common(check)
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    named = {
        "state_dir": ("agent", "state_dir"), "root": ("agent", "root"),
        "listen": ("agent", "listen"), "port": ("agent", "port"),
        "token_file": ("agent", "token_file"), "n_prompt": ("bench", "n_prompt"),
        "n_gen": ("bench", "n_gen"), "repetitions": ("bench", "repetitions"),
        "tolerance": ("bench", "tolerance"),
    }  # fmt: skip
    for attr, (section, key) in named.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{section}.{key}={json.dumps(value)}")
    if getattr(args, "threads", None):
        overrides.append(f"bench.threads=[{args.threads}]")
    return load(args.config, overrides)


def _serving(cfg: Config) -> ssl.SSLContext | None:
    """What serving ``cfg`` reads besides the tokens, checked now (a ``ConfigError``): the
    server's TLS context (``None``: plain HTTP), ``agent.tls_ca`` and the allowlist."""
    context = tls.server_context(cfg)
    tls.client_context(cfg)
    if cfg["store"]["allowlist_file"]:
        Allowlist(cfg["store"]["allowlist_file"]).load()
    return context


def _logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _serve(
    args: argparse.Namespace,
    cfg: Config,
    tokens: Tokens,
    tls_context: ssl.SSLContext | None,
) -> int:
    from pi_agent.app import Agent

    agent = Agent(cfg, tokens, tls_context)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def reload() -> None:
        try:
            new = _config(args)
            new_tokens = read_tokens(new)
            new_tls = _serving(new)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        task = loop.create_task(agent.reload(new, new_tokens, new_tls))
        task.add_done_callback(lambda t: t.exception() and log.error("reload: %s", t.exception()))

    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await agent.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await agent.stop()
        return 1
    await stopping.wait()
    log.info("stopping")
    await agent.stop()
    return 0


def _bench(args: argparse.Namespace, cfg: Config) -> int:
    from pi_agent import bench
    from pi_agent.fsutil import sha256_file
    from pi_agent.host import Host
    from pi_agent.store import ModelStore

    state = Path(cfg["agent"]["state_dir"])
    model, sha = args.model, ""
    if model is None:
        store = ModelStore(state / "models")
        active = store.active()
        model = Path(cfg["decoder"]["model"]) if cfg["decoder"]["model"] else store.active_model()
        if model is None:
            print("pi-agent bench: no active model; pass --model", file=sys.stderr)
            return 2
        if active and not cfg["decoder"]["model"]:
            sha = store.manifest(active)["sha256"]
    if not model.is_file():
        print(f"pi-agent bench: {model}: no such file", file=sys.stderr)
        return 2
    sha = sha or sha256_file(model)
    conf = cfg["bench"]
    history = [
        p
        for d in [*args.history, *([Path(conf["history_dir"])] if conf["history_dir"] else [])]
        for p in sorted(Path(d).glob("*.csv"))
    ]
    try:
        params = bench.BenchParams(
            tuple(conf["threads"]), conf["n_prompt"], conf["n_gen"], conf["repetitions"]
        )
        summary = bench.run(
            binary=Path(cfg["llama"]["bin_dir"]) / "llama-bench", model=model, model_sha256=sha,
            params=params, host=Host(Path(cfg["agent"]["root"])), out_dir=state / "bench",
            vcgencmd=cfg["metrics"]["vcgencmd"], build=cfg["llama"]["build"],
            tolerance=conf["tolerance"], history=history, board=args.board,
            timeout=conf["timeout_s"], expected=args.expect,
        )  # fmt: skip
    except (bench.BenchError, OSError) as exc:
        print(f"pi-agent bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if not summary["gate"]["passed"]:
        for failure in summary["gate"]["failures"]:
            print(f"pi-agent bench: gate failed: {failure}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pi-agent``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args)
        serving = args.command == "serve"
        tokens = read_tokens(cfg) if serving else Tokens("")
        tls_context = _serving(cfg) if serving or args.command == "check-config" else None
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"pi-agent: bad configuration: {exc}", file=sys.stderr)
        return 2
    _logging(cfg["agent"]["log_level"], args.debug)
    if args.command == "check-config":
        print(json.dumps(cfg, indent=2))
        return 0
    if args.command == "bench":
        return _bench(args, cfg)
    try:
        return asyncio.run(_serve(args, cfg, tokens, tls_context))
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":
    sys.exit(main())
