"""Installs from a URL: a version downloaded over http(s) into the model store, verified by
sha256, an https server verified with the agent's client context (``agent.tls_ca``).

``urllib.request`` brings the email parser with it: the agent imports this module at its first
URL install, not at start."""

from __future__ import annotations

import base64
import http.client
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from pi_agent.store import MIB, ModelStore, StoreError


def install_url(
    store: ModelStore,
    version: str,
    url: str,
    sha256: str,
    name: str = "",
    timeout: float = 600.0,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Download a version over http(s), verified by sha256 (blocking: run it in a thread);
    an https server is verified with ``context`` (``pi_agent.tls.client_context``).

    Credentials in the URL (``user:password@``) go as HTTP basic auth and never into an
    error or the manifest's ``source``.
    """
    if not url.startswith(("http://", "https://")):
        raise StoreError("url must be http:// or https://", 400)
    store.check_allowed(sha256)  # before the download begins
    plain, userinfo = split_credentials(url)
    shown = redact(url)
    secrets = [part for part in (userinfo, *userinfo.split(":", 1)) if part]

    def said(exc: object) -> str:
        text = str(exc)
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    headers = {}
    if userinfo:
        credentials = urllib.parse.unquote(userinfo).encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    try:
        request = urllib.request.Request(plain, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout, context=context)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise StoreError(f"cannot download {shown!r}: {said(exc)}", 502) from None
    with response:
        length = response.headers.get("Content-Length")
        size_hint = int(length) if length and length.isdigit() else None

        def read() -> Iterable[bytes]:
            try:
                while block := response.read(MIB):
                    yield block
            except (OSError, http.client.HTTPException) as exc:
                raise StoreError(f"download of {shown!r} failed: {said(exc)}", 502) from None

        return store.install(version, read(), sha256, name, size_hint, source=shown)


def split_credentials(url: str) -> tuple[str, str]:
    """The URL without ``user:password@``, and that user info ("" when none)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, ""
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), userinfo


def redact(url: str) -> str:
    """The URL with its credentials replaced by ``***``, fit for logs, errors and manifests."""
    try:
        plain, userinfo = split_credentials(url)
    except ValueError:
        return "<unparsable url>"
    if not userinfo:
        return url
    parts = urllib.parse.urlsplit(plain)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{parts.netloc}"))
