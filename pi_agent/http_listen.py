"""Listening for the HTTP server: its sockets, and the open files limit they draw on."""

from __future__ import annotations

import logging
import resource
import socket

log = logging.getLogger(__name__)


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one (systemd gives services 1,024 unless the
    unit says otherwise); the ``(soft, hard)`` limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an unlimited hard limit beyond the kernel's cap
            log.debug("open files limit stays %d: %s", soft, exc)
    return soft, hard


def listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (the port ``port`` picks, for all)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):
            if sockets:  # port 0: the others take the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.create_server(address, family=family, backlog=backlog)
            sock.setblocking(False)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
