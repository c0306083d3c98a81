"""sd_notify over a real datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

from pi_agent import sdnotify


def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(1024) == b"READY=1"


def test_notify_without_systemd_is_a_no_op() -> None:
    assert not sdnotify.notify("READY=1", {})


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
