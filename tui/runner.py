"""The ansible-runner bridge: run a playbook in a thread, post each event, save the stream.

    run = PlaybookRun(RunRequest(playbook=..., inventory=[...], project_dir=...),
                      run_dir=new_run_dir(project_dir / "runs" / "tui"), post=screen.post_message)
    run.start()          # returns at once; events arrive as RunnerEvent, the end as RunFinished
    run.cancel()         # ansible-runner's cancel_callback picks it up within a second
    replay(run_dir / "events.jsonl", screen.post_message)   # the same messages, from the file

The event handler does two things only: append the event to ``events.jsonl`` and post a
``RunnerEvent``; every decision about what the event means is the screen's. ansible-runner runs
``ansible-playbook`` from PATH, so the venv's ``bin`` goes first on the PATH it passes on; an
explicit ``localhost`` gets ``ansible_python_interpreter: {{ ansible_playbook_python }}`` from a
``host_vars`` file beside an (empty) inventory source of the run's own, because interpreter
discovery on these machines finds a broken pyenv shim.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from textual.message import Message

from distill.records import dumps_row, iter_json_lines
from tui.messages import RunFinished, RunnerEvent

Post = Callable[[Message], object]

EVENTS_FILE = "events.jsonl"
# The playbooks the run screen offers first, in this order, when they exist.
KNOWN_PLAYBOOKS = ("site", "provision", "deploy", "bench", "lab")


@dataclass(frozen=True)
class RunRequest:
    """Everything one ``ansible-playbook`` invocation needs."""

    playbook: Path
    inventory: list[Path]
    project_dir: Path
    tags: str = ""
    skip_tags: str = ""
    limit: str = ""
    extra_vars: dict[str, Any] = field(default_factory=dict)
    check: bool = False

    def describe(self) -> str:
        """The equivalent command line, for the log pane."""
        argv = ["ansible-playbook", str(self.playbook)]
        for source in self.inventory:
            argv += ["-i", str(source)]
        if self.limit:
            argv += ["--limit", self.limit]
        if self.tags:
            argv += ["--tags", self.tags]
        if self.skip_tags:
            argv += ["--skip-tags", self.skip_tags]
        if self.extra_vars:
            argv += ["-e", json.dumps(self.extra_vars)]
        if self.check:
            argv.append("--check")
        return shlex.join(argv)


def parse_extra_vars(text: str) -> dict[str, Any]:
    """Extra vars as a YAML/JSON mapping (``{a: 1}``, ``a: 1``) or ``key=value`` words.

    Raises ``ValueError`` with a one-line message on anything else.
    """
    text = text.strip()
    if not text:
        return {}
    if "=" in text and ":" not in text.split("=", 1)[0] and not text.startswith("{"):
        pairs = {}
        for word in shlex.split(text):
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise ValueError(f"extra vars: expected key=value, got {word!r}")
            pairs[key] = value
        return pairs
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"extra vars: not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError("extra vars: expected a mapping such as {key: value} or key=value")
    return data


def find_playbooks(project_dir: Path) -> list[Path]:
    """The project's playbooks: the known operations first, then any other ``playbooks/*.yml``
    (``_name.yml`` files are helpers, not operations, and stay hidden)."""
    folder = project_dir / "playbooks"
    found = [p for p in folder.glob("*.yml") if not p.name.startswith("_")]
    order = {name: i for i, name in enumerate(KNOWN_PLAYBOOKS)}
    return sorted(found, key=lambda p: (order.get(p.stem, len(order)), p.stem))


def find_runs(base: Path) -> list[Path]:
    """Saved event streams under ``base`` (``runs/tui``), newest first."""
    if not base.is_dir():
        return []
    return sorted(base.glob(f"*/{EVENTS_FILE}"), reverse=True)


def new_run_dir(base: Path) -> Path:
    """A fresh ``<base>/<UTC timestamp>`` directory (a suffix keeps two runs a second apart)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        path = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise OSError(f"{base}: cannot make a run directory for {stamp}")


def venv_env() -> dict[str, str]:
    """Environment for ansible-runner: this interpreter's ``bin`` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {"PATH": bin_dir + (os.pathsep + path if path else "")}


def _localhost_source(run_dir: Path) -> Path:
    """An empty inventory source whose ``host_vars`` pins localhost's interpreter."""
    source = run_dir / "inventory"
    (source / "host_vars").mkdir(parents=True, exist_ok=True)
    (source / "hosts.yml").write_text("# fleet-tui: no hosts, only host_vars/\nall: {}\n")
    (source / "host_vars" / "localhost.yml").write_text(
        "# fleet-tui: interpreter discovery on localhost finds a broken pyenv shim\n"
        'ansible_python_interpreter: "{{ ansible_playbook_python }}"\n'
    )
    return source


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc (empty where there is no /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), cmdline)
    return table


def _with_descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """``roots`` that are still alive, and every process below them in ``table``."""
    found = {pid for pid in roots if pid in table}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        found.update(children)
        frontier += children
    return found


def run_processes(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``, and all their descendants.

    ansible's workers call ``setsid()``, so ansible-runner's cancel (a SIGKILL to the
    ansible-playbook process group) leaves them and the modules they started running; this
    finds them while their parent links still lead back to ansible-playbook.
    """
    table = _process_table()
    found = {pid for pid, (_, cmdline) in table.items() if marker in cmdline}
    return sorted(_with_descendants(found, table) - {os.getpid()})


def freeze_trees(roots: list[int]) -> set[int]:
    """SIGSTOP ``roots`` and everything below them; returns the pids it stopped.

    A process may fork between the moment the tree is listed and the stop, so the tree is
    listed again until nothing new appears: a stopped process starts nothing more.
    """
    seen: set[int] = set()
    while True:
        new = _with_descendants(set(roots) | seen, _process_table()) - seen - {os.getpid()}
        if not new:
            return seen
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        seen |= new


def kill_trees(roots: list[int] | set[int], settle: float = 5.0) -> set[int]:
    """SIGKILL ``roots`` and everything below them (frozen first, so nothing escapes).

    Waits up to ``settle`` seconds for them to be gone; returns the pids it killed.
    """
    doomed = freeze_trees(list(roots))
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        table = _process_table()  # a zombie has an empty command line: it is gone for us
        if not any(table.get(pid, (0, ""))[1] for pid in doomed):
            break
        time.sleep(0.05)
    return doomed


class PlaybookRun:
    """One playbook run in its own thread; posts ``RunnerEvent``\\s then one ``RunFinished``."""

    def __init__(self, request: RunRequest, run_dir: Path, post: Post) -> None:
        self.request = request
        self.run_dir = run_dir
        self.events_path = run_dir / EVENTS_FILE
        self._post = post
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: Any = None
        self._orphans: list[int] = []
        # The run's own inventory source is on ansible-playbook's command line (and its
        # workers', which are forks of it): it finds the run's processes.
        self._marker = str(run_dir / "inventory")

    @property
    def running(self) -> bool:
        """Whether the runner thread is still alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the runner thread (returns at once)."""
        self._events = self.events_path.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="ansible-runner", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop the run: freeze ansible-playbook, its workers and their modules at once (the
        runner only looks at its cancel_callback every few seconds, and a worker would start
        its module meanwhile), let ansible-runner kill its process group, then kill the rest."""
        self._orphans = sorted(freeze_trees(run_processes(self._marker)))
        self._cancel.set()

    def _reap(self) -> None:
        # A cancel that came before ansible-playbook started froze nothing; its workers are
        # still found by the marker once orphaned.
        kill_trees([*self._orphans, *run_processes(self._marker)])

    def wait(self, timeout: float | None = None) -> bool:
        """Join the runner thread; True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _handle(self, event: dict[str, Any]) -> bool:
        # flushed, not fsynced: a crash may cut the last event, and replay reports that line
        self._events.write(dumps_row(event))
        self._events.flush()
        self._post(RunnerEvent(event))
        return True

    def _run(self) -> None:
        import ansible_runner  # heavy: only when a run starts

        req = self.request
        cmdline = ["--check"] if req.check else []
        if req.skip_tags:
            cmdline += ["--skip-tags", req.skip_tags]
        try:
            result = ansible_runner.run(
                private_data_dir=str(self.run_dir),
                project_dir=str(req.project_dir),
                playbook=str(req.playbook.resolve()),
                inventory=[str(_localhost_source(self.run_dir))]
                + [str(p.resolve()) for p in req.inventory],
                limit=req.limit or None,
                tags=req.tags or None,
                extravars=req.extra_vars or None,
                cmdline=shlex.join(cmdline) if cmdline else None,
                envvars=venv_env(),
                event_handler=self._handle,
                cancel_callback=self._cancel.is_set,
                quiet=True,
            )
            finished = RunFinished(result.status, result.rc)
        except Exception as err:  # any failure to start must reach the user, not kill the thread
            finished = RunFinished("error", None, f"{type(err).__name__}: {err}")
        finally:
            if self._cancel.is_set():  # frozen processes must not stay behind, whatever the end
                self._reap()
            self._events.close()
        self._post(finished)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a saved stream; ``ValueError`` naming the file and line if one is bad."""
    for number, event in iter_json_lines(path):
        if not isinstance(event, dict):
            raise ValueError(f"{path}:{number}: expected an event object")
        yield event


def status_of(events: list[dict[str, Any]]) -> str:
    """A finished stream's status as ansible-runner names it, read from its stats."""
    for event in reversed(events):
        if event.get("event") == "playbook_on_stats":
            data = event.get("event_data") or {}
            return "failed" if data.get("failures") or data.get("dark") else "successful"
    return "failed"


def replay(path: Path, post: Post) -> int:
    """Post a saved stream's events as a live run would, then ``RunFinished``; the event count."""
    events = list(read_events(path))
    for event in events:
        post(RunnerEvent(event))
    post(RunFinished(status_of(events), None))
    return len(events)
