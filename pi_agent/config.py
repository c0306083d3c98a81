"""Configuration: packaged defaults, then ``/etc/pi-agent/agent.toml``, then the command line.

The packaged ``defaults.toml`` is also the schema: a key it lacks is a typo, a value of another type
is an error. Every error is one line (``ConfigError``); the CLI prints it and exits 2.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULTS = Path(__file__).with_name("defaults.toml")
SYSTEM_CONFIG = Path("/etc/pi-agent/agent.toml")

COLLECTORS = (
    "thermal", "throttling", "memory", "zram", "cpu", "llama_server", "bench", "blobs", "disk",
)  # fmt: skip
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the key and the file."""


Config = dict[str, dict[str, Any]]


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def _merge(base: Config, layer: dict[str, Any], source: str) -> None:
    for section, values in layer.items():
        if section not in base:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            if key not in base[section]:
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            default = base[section][key]
            if not _same_type(default, value):
                raise ConfigError(
                    f"{source}: {section}.{key} must be {type(default).__name__}, "
                    f"not {type(value).__name__}"
                )
            base[section][key] = float(value) if isinstance(default, float) else value


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a TOML value (bare words are taken as strings)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _check(cfg: Config, source: str) -> None:
    agent = cfg["agent"]
    for section, key in (("agent", "port"), ("decoder", "port"), ("encoder", "port")):
        if not 0 <= cfg[section][key] <= 65535:
            raise ConfigError(f"{source}: {section}.{key} must be 0-65535")
    if agent["log_level"] not in LOG_LEVELS:
        raise ConfigError(f"{source}: agent.log_level must be one of {', '.join(LOG_LEVELS)}")
    for section, key in (
        ("agent", "max_body_bytes"), ("agent", "max_upload_bytes"),
        ("agent", "max_constraint_bytes"), ("agent", "max_connections"), ("decoder", "ctx_size"),
        ("decoder", "threads"),
        ("decoder", "batch_size"),
        ("decoder", "ubatch_size"), ("decoder", "parallel"), ("encoder", "ctx_size"),
        ("encoder", "threads"), ("encoder", "batch_size"), ("encoder", "ubatch_size"),
        ("store", "keep_versions"), ("store", "probe_max_tokens"), ("bench", "n_prompt"),
        ("bench", "n_gen"), ("bench", "repetitions"),
    ):  # fmt: skip
        if cfg[section][key] < 1:
            raise ConfigError(f"{source}: {section}.{key} must be at least 1")
    for key in ("head_timeout_s", "upload_deadline_s"):
        if not agent[key] > 0:
            raise ConfigError(f"{source}: agent.{key} must be positive")
    for key in ("cache_type_k", "cache_type_v"):
        if cfg["decoder"][key] not in KV_TYPES:
            raise ConfigError(f"{source}: decoder.{key} must be one of {', '.join(KV_TYPES)}")
    unknown = set(cfg["metrics"]["collectors"]) - set(COLLECTORS)
    if unknown:
        raise ConfigError(f"{source}: unknown collector(s) {', '.join(sorted(unknown))}")
    threads = cfg["bench"]["threads"]
    if not threads or not all(isinstance(t, int) and not isinstance(t, bool) for t in threads):
        raise ConfigError(f"{source}: bench.threads must be a non-empty list of integers")
    if not 0 <= cfg["bench"]["tolerance"] < 1:
        raise ConfigError(f"{source}: bench.tolerance must be in [0, 1)")
    if cfg["store"]["free_space_margin_mib"] < 0:
        raise ConfigError(f"{source}: store.free_space_margin_mib must not be negative")
    incoming = cfg["store"]["incoming_dir"]
    if incoming and not Path(incoming).is_absolute():
        raise ConfigError(f"{source}: store.incoming_dir must be an absolute path")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then ``path`` (else /etc/pi-agent/agent.toml when it exists), then overrides."""
    cfg: Config = copy.deepcopy(_read(DEFAULTS))
    if path is not None:
        _merge(cfg, _read(Path(path)), str(path))
    elif SYSTEM_CONFIG.is_file():
        _merge(cfg, _read(SYSTEM_CONFIG), str(SYSTEM_CONFIG))
    source = "command line"
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(cfg, {section: {key: value}}, f"{source} ({text})")
    _check(cfg, str(path) if path is not None and not overrides else "config")
    return cfg


def _read_secret(cfg: Config, key: str) -> str:
    path = Path(cfg["agent"][key])
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"agent.{key} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < 16:
        raise ConfigError(f"agent.{key} {path}: the token must be at least 16 characters")
    return token


def read_token(cfg: Config) -> str:
    """The bearer token from ``agent.token_file``; a missing or short one is a config error."""
    return _read_secret(cfg, "token_file")


def read_peer_token(cfg: Config) -> str:
    """The fleet's peer token from ``agent.peer_token_file`` ("" when unset); a missing or short
    one is a config error."""
    return _read_secret(cfg, "peer_token_file") if cfg["agent"]["peer_token_file"] else ""


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens an agent accepts: its own (everything), the fleet's peer token (blobs)
    and the fleet's service token (inference and reads); "" where unset."""

    agent: str
    peer: str = ""
    service: str = ""


def read_tokens(cfg: Config) -> Tokens:
    """Every token of ``cfg``; a missing or short one is a config error naming its key, and so
    is one token given twice (a service or peer token would then open everything)."""
    tokens = Tokens(
        read_token(cfg),
        read_peer_token(cfg),
        _read_secret(cfg, "service_token_file") if cfg["agent"]["service_token_file"] else "",
    )
    given = [t for t in (tokens.agent, tokens.peer, tokens.service) if t]
    if len(set(given)) != len(given):
        raise ConfigError(
            "agent.token_file, peer_token_file and service_token_file must hold different tokens"
        )
    return tokens
