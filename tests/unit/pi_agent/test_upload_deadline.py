"""An upload that outlives ``agent.upload_deadline_s`` is 408, and leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pi_agent.config import ConfigError, load
from pi_agent.testing import AgentProcess

CONFIG = {"decoder": {"enabled": False}, "agent": {"upload_deadline_s": 1.0}}


def test_a_stalled_upload_is_408_after_the_deadline_and_keeps_nothing(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, CONFIG) as agent:
        data = os.urandom(256 * 1024)
        upload = agent.upload("v1", len(data), hashlib.sha256(data).hexdigest())
        upload.send(data[:1024])  # then the client goes quiet
        status, body = upload.response()
        assert status == 408, body
        versions = agent.state_dir / "models" / "versions"
        assert versions.is_dir() and not [p.name for p in versions.iterdir()]
        assert agent.json("GET", "/v1/models/v1")[0] == 404


def test_a_deadline_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nupload_deadline_s = 0\n")
    with pytest.raises(ConfigError, match=r"agent\.upload_deadline_s must be positive"):
        load(path)
