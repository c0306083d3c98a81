"""The model allowlist (``store.allowlist_file``) on real agent processes: a version is installed
(upload, URL, incoming folder) and activated only when its sha256 is listed, anything else is a
403 naming the sha256 with nothing left in the store, and an edit of the file takes effect
without a restart."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from pi_agent import cli
from pi_agent.allowlist import Allowlist
from pi_agent.config import ConfigError
from pi_agent.store import StoreError
from pi_agent.testing import AgentProcess, to_toml

CONFIG = {"decoder": {"enabled": False}, "store": {"free_space_margin_mib": 0}}


def model(seed: int) -> tuple[bytes, str]:
    data = os.urandom(64 * 1024 + seed)
    return data, hashlib.sha256(data).hexdigest()


def write_list(path: Path, *shas: str) -> None:
    """Write the list as Ansible does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# the fleet's models\n\n" + "".join(f"{sha}  # a model\n" for sha in shas))
    tmp.rename(path)


def agent_with_list(base: Path, *shas: str) -> AgentProcess:
    base.mkdir(parents=True, exist_ok=True)
    listed = base / "allowlist"
    write_list(listed, *shas)
    return AgentProcess(base, {**CONFIG, "store": {**CONFIG["store"], "allowlist_file": listed}})


def upload(agent: AgentProcess, version: str, data: bytes, sha: str) -> tuple[int, dict]:
    sending = agent.upload(version, len(data), sha)
    sending.send(data)
    return sending.response()


def store_entries(agent: AgentProcess) -> list[str]:
    """Everything under the store's versions folder (locks and partial installs included)."""
    return sorted(p.name for p in (agent.state_dir / "models" / "versions").iterdir())


def test_an_unlisted_upload_is_403_and_leaves_nothing(tmp_path: Path) -> None:
    data, sha = model(1)
    _, other = model(2)
    with agent_with_list(tmp_path, other) as agent:
        # The head alone is answered: no byte of the body is waited for, nor written.
        status, answer = agent.upload("m1", len(data), sha).response()
        assert status == 403
        message = answer["error"]["message"]
        assert sha in message and "allowlist" in message and "\n" not in message
        assert store_entries(agent) == []
        assert upload(agent, "m1", data, sha)[0] == 403  # the body sent as well
        assert store_entries(agent) == []
        assert agent.json("GET", "/v1/models")[1]["data"] == []


def test_a_listed_upload_is_201_and_can_be_activated(tmp_path: Path) -> None:
    data, sha = model(3)
    with agent_with_list(tmp_path, sha) as agent:
        assert upload(agent, "m1", data, sha)[0] == 201
        status, answer = agent.json("POST", "/v1/models/m1/activate")
        assert status == 200 and answer["active"] == "m1"


def test_a_listed_sha256_with_other_bytes_is_still_a_422(tmp_path: Path) -> None:
    data, sha = model(4)
    with agent_with_list(tmp_path, sha) as agent:
        assert upload(agent, "m1", data[:-1] + b"x", sha)[0] == 422
        assert store_entries(agent) == []


def test_a_delisted_version_cannot_be_activated_nor_rolled_back_to(tmp_path: Path) -> None:
    (a, sha_a), (b, sha_b) = model(5), model(6)
    with agent_with_list(tmp_path, sha_a, sha_b) as agent:
        listed = agent.base / "allowlist"
        assert upload(agent, "a", a, sha_a)[0] == 201
        assert upload(agent, "b", b, sha_b)[0] == 201
        assert agent.json("POST", "/v1/models/a/activate")[0] == 200
        write_list(listed, sha_b)  # a is delisted while it is the active one
        assert agent.json("POST", "/v1/models/b/activate")[0] == 200
        status, answer = agent.json("POST", "/v1/models/rollback")
        assert status == 403 and sha_a in answer["error"]["message"]
        status, answer = agent.json("POST", "/v1/models/a/activate")
        assert status == 403 and sha_a in answer["error"]["message"]
        assert agent.json("GET", "/v1/models/b")[1]["active"] is True
        write_list(listed, sha_a, sha_b)  # listed again, without a restart
        assert agent.json("POST", "/v1/models/a/activate")[0] == 200


def test_editing_the_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    data, sha = model(7)
    with agent_with_list(tmp_path) as agent:
        assert upload(agent, "m1", data, sha)[0] == 403
        # edited in place (same inode), as an admin with an editor might
        with (agent.base / "allowlist").open("a") as handle:
            handle.write(sha.upper() + "\n")
        assert upload(agent, "m1", data, sha)[0] == 201
        write_list(agent.base / "allowlist")  # emptied: nothing more installs
        assert upload(agent, "m2", data, sha)[0] == 403


def test_url_and_incoming_installs_are_refused_before_any_byte(tmp_path: Path) -> None:
    data, sha = model(8)
    with agent_with_list(tmp_path) as agent:
        # Nothing listens on port 1: a download attempted first would be a 422.
        body = {"version": "u1", "url": "http://127.0.0.1:1/m.gguf", "sha256": sha}
        status, answer = agent.json("POST", "/v1/models", body)
        assert status == 403 and sha in answer["error"]["message"]
        dropped = agent.state_dir / "incoming" / "m.gguf"
        dropped.write_bytes(data)
        body = {"version": "p1", "path": str(dropped), "sha256": sha}
        status, answer = agent.json("POST", "/v1/models", body)
        assert status == 403 and sha in answer["error"]["message"]
        assert dropped.read_bytes() == data  # a refused path is left as it was
        assert store_entries(agent) == []


def test_sighup_rereads_the_file(tmp_path: Path) -> None:
    data, sha = model(9)
    _, other = model(10)
    with agent_with_list(tmp_path, other) as agent:
        assert upload(agent, "m1", data, sha)[0] == 403
        listed = agent.base / "allowlist"
        before = listed.stat()
        listed.write_text(listed.read_text().replace(other, sha))  # same inode and size...
        os.utime(listed, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and time: unseen
        assert upload(agent, "m1", data, sha)[0] == 403
        agent.signal(signal.SIGHUP)
        agent.wait_for(lambda: "configuration reloaded" in agent.log())
        assert upload(agent, "m1", data, sha)[0] == 201


def test_the_allowlist_file_reads_comments_and_blank_lines(tmp_path: Path) -> None:
    _, a = model(10)
    _, b = model(11)
    path = tmp_path / "allowlist"
    path.write_text(f"# fleet models\n\n{a}\n  {b.upper()}   # smol v2\n")
    allowlist = Allowlist(path)
    allowlist.check(a)
    allowlist.check(b)
    _, c = model(12)
    with pytest.raises(StoreError) as refused:
        allowlist.check(c)
    assert refused.value.status == 403 and c in str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "No such file"),
        ("not-a-sha256\n", "line 1"),
        ("# ok\n" + "a" * 63 + "\n", "line 2"),
    ],
    ids=["a missing file", "a line that is no sha256", "a sha256 one digit short"],
)
def test_a_bad_allowlist_is_one_line_exit_2(tmp_path: Path, capsys, text, message) -> None:
    (tmp_path / "token").write_text("t" * 32 + "\n")
    listed = tmp_path / "allowlist"
    if text is not None:
        listed.write_text(text)
    config = tmp_path / "agent.toml"
    config.write_text(
        to_toml({"agent": {"token_file": tmp_path / "token"}, "store": {"allowlist_file": listed}})
    )
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "store.allowlist_file" in err and message in err
    with pytest.raises(ConfigError):
        Allowlist(listed).load()


def test_a_file_broken_while_running_refuses_everything(tmp_path: Path) -> None:
    data, sha = model(13)
    with agent_with_list(tmp_path, sha) as agent:
        (agent.base / "allowlist").write_text(f"{sha}\nnonsense\n")
        status, answer = upload(agent, "m1", data, sha)
        assert status == 403 and "line 2" in answer["error"]["message"]
        (agent.base / "allowlist").unlink()
        assert upload(agent, "m1", data, sha)[0] == 403
        write_list(agent.base / "allowlist", sha)
        assert upload(agent, "m1", data, sha)[0] == 201


def test_a_sha256_delisted_during_the_upload_is_refused_at_the_commit(tmp_path: Path) -> None:
    data, sha = model(14)
    with agent_with_list(tmp_path, sha) as agent:
        sending = agent.upload("m1", len(data), sha)
        sending.send(data[:1000])
        agent.wait_for(lambda: any(n.startswith(".incoming-") for n in store_entries(agent)))
        write_list(agent.base / "allowlist")
        sending.send(data[1000:])
        status, answer = sending.response()
        assert status == 403 and sha in answer["error"]["message"]
        assert store_entries(agent) == []


def test_the_openapi_document_says_why_an_install_may_be_403() -> None:
    from pi_agent.openapi import document

    paths = document()["paths"]
    for path, method in (("/v1/models", "post"), ("/v1/models/{version}/activate", "post")):
        assert "allowlist" in paths[path][method]["responses"]["403"]["description"]
    assert "allowlist" not in paths["/v1/status"]["get"]["responses"]["403"]["description"]
