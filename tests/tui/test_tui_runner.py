"""The ansible-runner bridge without the UI: requests, saved streams and their replay."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tui.messages import RunFinished, RunnerEvent
from tui.runner import (
    RunRequest,
    find_playbooks,
    find_runs,
    kill_trees,
    new_run_dir,
    parse_extra_vars,
    read_events,
    replay,
    run_processes,
    status_of,
)

EXTRA_VARS = {
    "nothing": ("", {}),
    "key=value words": (
        "model_sync_canary=2 zram_size='1 G'",
        {"model_sync_canary": "2", "zram_size": "1 G"},
    ),
    "a YAML mapping": ("{threads: [2, 4], check: true}", {"threads": [2, 4], "check": True}),
    "block YAML": ("threads: 4", {"threads": 4}),
}


@pytest.mark.parametrize(("text", "expected"), EXTRA_VARS.values(), ids=EXTRA_VARS.keys())
def test_extra_vars(text: str, expected: dict) -> None:
    assert parse_extra_vars(text) == expected


@pytest.mark.parametrize(
    "text", ["[1, 2]", "{unclosed", "just words"], ids=["a list", "bad YAML", "no mapping"]
)
def test_bad_extra_vars_are_one_line_errors(text: str) -> None:
    with pytest.raises(ValueError, match=r"^extra vars: "):
        parse_extra_vars(text)


def test_the_known_playbooks_come_first(tmp_path: Path) -> None:
    (tmp_path / "playbooks").mkdir()
    for name in ("zz", "lab", "site", "bench", "deploy", "_stub_build"):
        (tmp_path / "playbooks" / f"{name}.yml").write_text("---\n")
    assert [p.stem for p in find_playbooks(tmp_path)] == ["site", "deploy", "bench", "lab", "zz"]
    assert find_playbooks(tmp_path / "nowhere") == []


def test_run_directories_never_collide(tmp_path: Path) -> None:
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    (second / "events.jsonl").write_text("")
    assert find_runs(tmp_path) == [second / "events.jsonl"]


def test_describe_is_the_equivalent_command_line(tmp_path: Path) -> None:
    request = RunRequest(
        playbook=Path("playbooks/site.yml"),
        inventory=[Path("inventory/lab.yml")],
        project_dir=tmp_path,
        tags="zram",
        limit="pi5",
        extra_vars={"a": 1},
        check=True,
    )
    assert request.describe() == (
        "ansible-playbook playbooks/site.yml -i inventory/lab.yml --limit pi5 --tags zram "
        "-e '{\"a\": 1}' --check"
    )


def test_replay_posts_every_recorded_event_then_the_end(fixtures: Path) -> None:
    posted: list[object] = []
    count = replay(fixtures / "events" / "local.jsonl", posted.append)
    events = [m.event for m in posted if isinstance(m, RunnerEvent)]
    assert len(events) == count > 20
    assert events[0]["event"] == "playbook_on_start"
    assert events[-1]["event"] == "playbook_on_stats"
    assert isinstance(posted[-1], RunFinished) and posted[-1].status == "successful"


def test_an_unreachable_host_makes_the_replayed_run_fail(fixtures: Path) -> None:
    events = list(read_events(fixtures / "events" / "unreachable.jsonl"))
    assert status_of(events) == "failed"
    assert status_of([]) == "failed"


def test_a_torn_stream_names_its_line_and_posts_nothing(tmp_path: Path, fixtures: Path) -> None:
    lines = (fixtures / "events" / "local.jsonl").read_text().splitlines()
    torn = tmp_path / "events.jsonl"
    torn.write_text("\n".join([*lines[:3], lines[3][:40]]) + "\n")
    posted: list[object] = []
    with pytest.raises(ValueError, match=r"events\.jsonl:4"):
        replay(torn, posted.append)
    assert posted == []


# A parent that keeps starting children in their own sessions, as ansible's workers do: a tree
# listed once and then killed would leave the children started in between.
FORKER = """
import os, subprocess, sys, time
while True:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)  # {marker}"],
                     start_new_session=True)
    time.sleep(0.01)
"""


def test_kill_trees_leaves_nothing_behind_even_while_the_tree_grows(tmp_path: Path) -> None:
    marker = f"pidistill-test-{tmp_path.name}"
    parent = subprocess.Popen([sys.executable, "-c", FORKER.format(marker=marker), marker])
    try:
        deadline = time.monotonic() + 30
        while len(run_processes(marker)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(run_processes(marker)) >= 5, "the forker never started its children"
        killed = kill_trees([parent.pid])
        assert parent.pid in killed
        assert not run_processes(marker)
    finally:
        parent.kill()
        parent.wait()
