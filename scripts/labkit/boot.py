"""Starting a stand-in (its address, a Pi's identity, systemd as PID 1) and waiting until it
answers SSH; saying why when it does not."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

from lab_arch import NATIVE, HostSpec, board_tree

from labkit.common import (
    ARCH_LABEL,
    BOARD_LABEL,
    CACHE,
    HOST_LABEL,
    NETWORK,
    PREFIX,
    InitDied,
    LabError,
    address,
    host_name,
    podman,
    ssh_args,
)
from labkit.image import image_name

RUN_OPTIONS = (
    "--systemd=always",
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
    # Pi-like: a few hundred MiB are plenty for systemd, sshd and the agent.
    "--memory=768m",
    "--pids-limit=1024",
)


def inspect_state(container: str) -> str:
    """podman's view of the container: status, PID 1, exit code, OOM kill, runtime error."""
    fmt = ("{{.State.Status}} pid={{.State.Pid}} exit={{.State.ExitCode}} "
           "oom={{.State.OOMKilled}} error={{.State.Error}}")  # fmt: skip
    return podman("inspect", "--format", fmt, container, check=False).strip() or "gone"


def init_alive(container: str) -> bool:
    """Whether the stand-in's PID 1 (systemd) still runs: podman may say "running" after the
    runtime has lost it, so ask the runtime (an exec) rather than podman's record."""
    done = subprocess.run(
        ["podman", "--runtime", "runc", "exec", container, "true"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return done.returncode == 0


def diagnose(container: str) -> str:
    """What a stand-in that does not answer SSH is doing: its state, systemd's, sshd's journal,
    and the last lines systemd wrote on the console (the container's log)."""
    lines = [f"state: {inspect_state(container)}"]
    for label, cmd in (
        ("systemd", ["systemctl", "is-system-running"]),
        ("failed units", ["systemctl", "--failed", "--no-legend", "--plain"]),
        ("sshd", ["journalctl", "--no-pager", "-n", "8", "-u", "ssh.service"]),
        ("listening", ["ss", "-tln"]),
    ):
        done = subprocess.run(
            ["podman", "--runtime", "runc", "exec", container, *cmd],
            capture_output=True, text=True, check=False, timeout=20,
        )  # fmt: skip
        lines.append(f"{label}: {(done.stdout + done.stderr).strip()[-600:]}")
    console = subprocess.run(["podman", "logs", "--tail", "15", container], capture_output=True,
                             text=True, check=False, timeout=20)  # fmt: skip
    lines.append("console: " + (console.stdout + console.stderr).strip()[-1500:])
    try:
        route = subprocess.run(["ip", "route", "get", address(container)], capture_output=True,
                               text=True, check=False)  # fmt: skip
        lines.append(f"route: {(route.stdout + route.stderr).strip()}")
    except LabError as err:
        lines.append(f"route: {err}")
    return "\n  ".join(lines)


def wait_ssh(key: Path, container: str, timeout: float = 120.0) -> None:
    """Wait until ``pi`` can log in and run sudo over SSH; on timeout say what the host is doing.
    A stand-in whose systemd has died is not waited on: LabError at once, ``InitDied``."""
    try:
        host = address(container)
    except LabError as err:  # a container that has stopped has no address
        if init_alive(container):
            raise
        raise InitDied(f"{container}: its systemd (PID 1) is gone while booting: {err}\n"
                       f"  {diagnose(container)}") from err  # fmt: skip
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    while True:
        cmd = [*ssh_args(key, host), "sudo", "-n", "true"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        why = done.stderr.strip()[-300:] or f"exit {done.returncode}"
        if time.monotonic() - checked > 10:
            checked = time.monotonic()
            if not init_alive(container):
                raise InitDied(f"{container}: its systemd (PID 1) is gone while booting: {why}\n"
                               f"  {diagnose(container)}")  # fmt: skip
        if time.monotonic() > deadline:
            raise LabError(
                f"ssh to pi@{host} ({container}) not ready after {timeout:.0f}s: {why}\n"
                f"  {diagnose(container)}"
            )
        time.sleep(1)


def fixed_address(index: int) -> str:
    """Stand-in ``index``'s address on the lab network (the 10th + index of its subnet): the same
    across restarts and re-creations, so that its agent's certificate keeps matching it."""
    subnets = podman("network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}} {{end}}",
                     NETWORK).split()  # fmt: skip
    net = next(ipaddress.ip_network(s) for s in subnets if ipaddress.ip_network(s).version == 4)
    return str(net.network_address + 10 + index)


def identity_options(host: HostSpec) -> list[str]:
    """An arm64 stand-in's labels and its Pi's device tree (``/sys/firmware/devicetree/base``,
    where ``/proc/device-tree`` points on a Pi; runc refuses mounts inside /proc). podman masks
    /sys/firmware by default: unmasked for the folder bound there."""
    out = ["--label", f"{ARCH_LABEL}={host.arch}", "--label", f"{BOARD_LABEL}={host.board}"]
    if host.board:
        tree = board_tree(host.board, CACHE)
        out += ["--mount", f"type=bind,src={tree},dst=/sys/firmware,ro=true",
                "--security-opt", "unmask=/sys/firmware"]  # fmt: skip
    return out


def start(index: int, key: Path, host: HostSpec | None = None) -> str:
    """Boot stand-in number ``index`` (at its fixed address) and give ``pi`` the lab's key."""
    name = f"{PREFIX}{index}"
    host = host or HostSpec("amd64")
    podman(
        "run", "--detach",
        "--name", name,
        "--hostname", host_name(name),
        "--label", f"{HOST_LABEL}={index}",
        *identity_options(host),
        "--network", NETWORK,
        "--ip", fixed_address(index),
        *RUN_OPTIONS,
        image_name(host.arch),
    )  # fmt: skip
    public = key.with_suffix(".pub").read_text()
    podman(
        "exec", "-i", name, "sh", "-c",
        "umask 077 && cat > ~pi/.ssh/authorized_keys && chown pi:pi ~pi/.ssh/authorized_keys",
        stdin=public,
    )  # fmt: skip
    return name


def boot(index: int, key: Path, host: HostSpec | None = None) -> None:
    """Wait for stand-in ``index`` to answer SSH; one whose systemd died while booting is
    recreated once (the cause is printed), a second death is an error. Emulated stand-ins boot
    several times slower: they are given longer."""
    name = f"{PREFIX}{index}"
    host = host or HostSpec("amd64")
    timeout = 120.0 if host.arch == NATIVE else 600.0
    try:
        wait_ssh(key, name, timeout)
    except InitDied as err:
        print(f"lab: {err}\nlab: recreating {name} once", file=sys.stderr)
        podman("rm", "--force", "--time", "5", name)
        start(index, key, host)
        wait_ssh(key, name, timeout)


def host_spec(container: str) -> HostSpec:
    """What a lab container was made as (its labels; an older lab's hosts are amd64)."""
    out = podman("inspect", "--format", "{{json .Config.Labels}}", container, check=False)
    labels = json.loads(out or "{}") or {}
    return HostSpec(labels.get(ARCH_LABEL) or "amd64", labels.get(BOARD_LABEL) or "")


def raise_inotify_limits(count: int) -> None:
    """Every stand-in's systemd holds inotify instances of the workstation's user root: the
    default of 128 runs out near 25 stand-ins (systemd then hangs in "initializing"). Raise the
    limits to what ``count`` needs; never lower them."""
    wanted = {"max_user_instances": 128 + 64 * count, "max_user_watches": 65536 * (count + 2)}
    for name, value in wanted.items():
        path = Path("/proc/sys/fs/inotify") / name
        if int(path.read_text()) < value:
            path.write_text(f"{value}\n")
