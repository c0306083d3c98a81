"""Two installs of the same version at once, through a real agent: the second waits for the
first and finds the version installed (409), and the store never holds one upload's weights under
the other's manifest (served under the wrong ETag)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess

SIZE = 256 * 1024  # each upload fits loopback's socket buffers: a client never blocks sending
CONFIG = {"decoder": {"enabled": False}, "store": {"free_space_margin_mib": 0}}


def incoming_bytes(versions: Path) -> int:
    """Bytes written so far by uploads under way (in ``.incoming-*``)."""
    return sum(
        f.stat().st_size for d in versions.glob(".incoming-*") for f in d.iterdir() if f.is_file()
    )


def until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_two_uploads_of_one_version_never_mix(tmp_path: Path) -> None:
    first, second = os.urandom(SIZE), os.urandom(SIZE)  # a re-export: same size, other bytes
    sha1, sha2 = hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()
    with AgentProcess(tmp_path, CONFIG) as agent:
        versions = agent.state_dir / "models" / "versions"
        one = agent.upload("v1", SIZE, sha1)
        one.send(first[: SIZE // 2])
        assert until(lambda: any(versions.glob(".incoming-*")), 10)  # the first has begun
        two = agent.upload("v1", SIZE, sha2)
        sender = threading.Thread(target=two.send, args=(second[:-1],), daemon=True)
        sender.start()
        # The second upload must not write while the first is under way: give it the time to
        # (it took milliseconds before the per-version lock).
        until(lambda: incoming_bytes(versions) > SIZE // 2, 1.0)
        one.send(first[SIZE // 2 :])
        status1, body1 = one.response()
        two.send(second[-1:])
        status2, body2 = two.response()
        sender.join(10)
        assert (status1, body1.get("sha256")) == (201, sha1), body1
        assert status2 == 409 and "already installed" in body2["error"]["message"], body2
        store = ModelStore(agent.state_dir / "models")
        assert store.verify("v1")["sha256"] == sha1  # weights and manifest agree
        status, headers, body = agent.request("GET", f"/v1/blobs/{sha1}")
        assert status == 200 and body == first and headers["etag"] == f'"{sha1}"'
        assert agent.request("GET", f"/v1/blobs/{sha2}")[0] == 404
        assert not list(versions.glob(".incoming-*"))


def test_an_upload_refused_while_another_runs_leaves_the_first_whole(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    sha = hashlib.sha256(data).hexdigest()
    with AgentProcess(tmp_path, CONFIG) as agent:
        versions = agent.state_dir / "models" / "versions"
        one = agent.upload("v1", SIZE, sha)
        one.send(data[: SIZE // 2])
        assert until(lambda: any(versions.glob(".incoming-*")), 10)
        bad = agent.upload("v1", 10, "0" * 64)  # a wrong sha256: it fails, the first goes on
        bad.send(b"0123456789")
        until(lambda: len(list(versions.glob(".incoming-*"))) > 1, 1.0)
        one.send(data[SIZE // 2 :])
        assert one.response()[0] == 201
        assert bad.response()[0] in (409, 422)
        assert ModelStore(agent.state_dir / "models").verify("v1")["sha256"] == sha
