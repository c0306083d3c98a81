"""HTTPS for the agent: the server's context from ``agent.tls_cert`` and ``agent.tls_key``, the
client's from ``agent.tls_ca``, and the rule on plain HTTP.

Without TLS the bearer token crosses the network in clear, so plain HTTP is served only on a
loopback address, or where ``agent.allow_plain_http`` says so explicitly (the Ansible role does,
until the fleet has its CA). Each problem is one ``ConfigError`` line naming the setting.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

from pi_agent.config import Config, ConfigError

ALPN = ["http/1.1"]  # what the server speaks: a client offering h2 settles at once


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` listens on is a loopback one ("" is every address)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
    )


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The context the agent serves HTTPS with (``None``: plain HTTP, where it is allowed)."""
    agent = cfg["agent"]
    cert, key = agent["tls_cert"], agent["tls_key"]
    if bool(cert) != bool(key):
        missing = "agent.tls_key" if cert else "agent.tls_cert"
        raise ConfigError(f"agent.tls_cert and agent.tls_key go together: {missing} is not set")
    if not cert:
        listen = agent["listen"]
        if not agent["allow_plain_http"] and not is_loopback(listen):
            raise ConfigError(
                f"agent.listen {listen or '(every address)'!s} is not a loopback address: set "
                "agent.tls_cert and agent.tls_key to serve HTTPS, or agent.allow_plain_http = "
                "true to send the bearer token in clear"
            )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    for name, path in (("agent.tls_cert", cert), ("agent.tls_key", key)):
        try:
            with Path(path).open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name} {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"agent.tls_cert {cert} and agent.tls_key {key}: not a PEM certificate and its "
            f"private key ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    return context


def client_context(cfg: Config) -> ssl.SSLContext:
    """The context the agent's own https requests verify servers with: ``agent.tls_ca``, else
    the system's CAs; host names checked, TLS 1.2 at least."""
    ca = cfg["agent"]["tls_ca"]
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"agent.tls_ca {ca}: {reason}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
