"""Configuration layers and the one-line exit 2 on bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi_agent import cli
from pi_agent.config import ConfigError, load, read_peer_token, read_token


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_packaged_defaults_then_file_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[decoder]\nthreads = 2\nctx_size = 1024\n")
    cfg = load(path, ["decoder.threads=3", "agent.log_level=debug"])
    assert cfg["decoder"]["threads"] == 3  # the flag wins
    assert cfg["decoder"]["ctx_size"] == 1024  # the file wins over the defaults
    assert cfg["decoder"]["batch_size"] == 512  # the default
    assert cfg["agent"]["log_level"] == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[decoder]\nthreads = 'four'\n", "decoder.threads must be int"),
        ("[decoder]\nthread = 4\n", "unknown key decoder.thread"),
        ("[gpu]\nx = 1\n", "unknown section [gpu]"),
        ("[agent]\nport = 70000\n", "agent.port must be 0-65535"),
        ("[decoder]\ncache_type_k = 'q3'\n", "decoder.cache_type_k must be one of"),
        ("[metrics]\ncollectors = ['gpu']\n", "unknown collector(s) gpu"),
        ("[decoder\n", "agent.toml"),
        ("[agent]\nmax_constraint_bytes = 0\n", "agent.max_constraint_bytes must be at least 1"),
    ],
    ids=[
        "wrong type",
        "typo in a key",
        "unknown section",
        "port out of range",
        "unknown KV type",
        "unknown collector",
        "not TOML",
        "no room for a schema",
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "[decoder]\nthreads = 'four'\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decoder.threads" in err and "Traceback" not in err


def test_cli_exits_2_without_a_token(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"[agent]\ntoken_file = '{tmp_path / 'missing'}'\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert "token_file" in capsys.readouterr().err


def test_short_tokens_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("short\n")
    cfg = load(write(tmp_path, f"[agent]\ntoken_file = '{tmp_path / 'token'}'\n"))
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(cfg)


def test_check_config_prints_the_merged_config(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "[bench]\ntolerance = 0.1\n")
    assert cli.main(["check-config", "--config", str(path), "--set", "decoder.threads=1"]) == 0
    out = capsys.readouterr().out
    assert '"tolerance": 0.1' in out and '"threads": 1' in out


def test_no_peer_token_by_default(tmp_path: Path) -> None:
    assert read_peer_token(load(write(tmp_path, ""))) == ""


def test_the_peer_token_is_read_like_the_token(tmp_path: Path) -> None:
    (tmp_path / "peer").write_text("p" * 40 + "\n")
    cfg = load(write(tmp_path, f"[agent]\npeer_token_file = '{tmp_path / 'peer'}'\n"))
    assert read_peer_token(cfg) == "p" * 40
    (tmp_path / "peer").write_text("short\n")
    with pytest.raises(ConfigError, match=r"agent\.peer_token_file .* at least 16"):
        read_peer_token(cfg)


def test_cli_exits_2_with_one_line_when_the_peer_token_file_is_missing(
    tmp_path: Path, capsys
) -> None:
    (tmp_path / "token").write_text("t" * 32)
    path = write(
        tmp_path,
        f"[agent]\ntoken_file = '{tmp_path / 'token'}'\n"
        f"peer_token_file = '{tmp_path / 'missing'}'\n",
    )
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "agent.peer_token_file" in err and "No such file" in err


def test_a_relative_incoming_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.incoming_dir must be an absolute path"):
        load(write(tmp_path, "[store]\nincoming_dir = 'incoming'\n"))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[agent]\nlisten = '0.0.0.0'\n", 2),
        ("[agent]\nlisten = '0.0.0.0'\nallow_plain_http = true\n", 0),
        ("[agent]\nlisten = '::1'\n", 0),
        ("[agent]\ntls_ca = '/nonexistent/ca.pem'\n", 2),
    ],
    ids=[
        "plain HTTP on every address is refused",
        "unless allowed",
        "plain HTTP on IPv6 loopback is fine",
        "a CA bundle that does not read is refused",
    ],
)
def test_check_config_checks_what_serving_needs(tmp_path: Path, capsys, text: str, code: int):
    assert cli.main(["check-config", "--config", str(write(tmp_path, text))]) == code
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and "agent." in err) if code else err == ""
