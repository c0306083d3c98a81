"""The lab: stand-in Raspberry Pis, podman containers booted with systemd as PID 1.

    python scripts/lab.py up                # 3 stand-in Pis, inventory/lab.yml written
    python scripts/lab.py up --hosts 2      # or N=2 through `make lab-up`
    python scripts/lab.py image             # only the image (molecule scenarios boot it too)
    python scripts/lab.py status
    python scripts/lab.py down              # containers, network, key, image and inventory: gone
    python scripts/lab.py up --arch arm64 --hosts 2        # arm64 stand-ins (a Pi 4, a Pi 5)
    python scripts/lab.py up --arch x86_64,arm64,arm64     # one architecture per host

A stand-in is Raspberry Pi OS in miniature: a Debian bookworm root file system made once by
debootstrap (cached under .cache/lab/ as a tarball keyed by its recipe), imported as the image
``localhost/pidistill-lab:bookworm``, with a user ``pi`` that has passwordless sudo. Each host
has an address on the project's own podman network, ``pidistill-lab``, which the workstation routes
to directly, as it would to a real Pi on its LAN: SSH on port 22, pi-agent on 8470 (written into the
inventory as ``ansible_host`` and ``pi_agent_url``). The stand-ins reach each other the same way.
Nothing is published on the workstation's own addresses: no NAT sits between the lab's hosts.
Two quirks of these machines are built in (see shared/DESIGN.md): ``--runtime runc`` and ulimits
of 4096. Everything the lab makes carries a ``pidistill.lab`` label, by which ``down`` removes it.

arm64 stand-ins (``--arch``, spelled in ``lab_arch``) boot an arm64 root file system of the same
recipe plus Raspberry Pi OS's disk swap (dphys-swapfile), imported as
``localhost/pidistill-lab:bookworm-arm64``, under qemu-user through binfmt_misc, each with a
Pi 4's or a Pi 5's device tree strings.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab_arch import NATIVE, ArchError, HostSpec, board_tree, ensure_binfmt, parse_spec

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PIDISTILL_CACHE_DIR", ROOT / ".cache")) / "lab"
INVENTORY = ROOT / "inventory" / "lab.yml"
IMAGE = "localhost/pidistill-lab:bookworm"
NETWORK = "pidistill-lab"
LABEL = "pidistill.lab"
# Containers inherit the image's labels (molecule's too): the lab's own hosts carry this one.
HOST_LABEL = "pidistill.lab.host"
PREFIX = "pidistill-pi-"
# The architecture and board of a lab host (containers' labels; ``up`` recreates a host whose
# labels differ from what is asked).
ARCH_LABEL = "pidistill.lab.arch"
BOARD_LABEL = "pidistill.lab.board"
# pi-agent's port (pi_agent_port): the TUI, the tests and the other stand-ins reach it.
AGENT_PORT = 8470
SUITE = "bookworm"
MIRROR = os.environ.get("PIDISTILL_LAB_MIRROR", "http://deb.debian.org/debian")
# minbase + what a booted, SSH-reachable Pi needs, + what the roles would otherwise install
# over the network on every run (python3-apt for the apt module, libgomp1 for llama.cpp,
# python3-venv for the pi_agent role, aria2 and opentracker for model_sync's peers and torrent
# sources, libopenblas0 for an OpenBLAS build of llama.cpp).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "python3-venv",
    "sudo",
    "ca-certificates",
    "iproute2",
    "procps",
    "kmod",
    "libgomp1",
    "aria2",
    "opentracker",
    "libopenblas0",
)
# Run inside the chroot after debootstrap: Raspberry Pi OS's user, per-container host keys,
# pam_limits made optional, and no units that fight a container (consoles, apt's timers that
# would take the dpkg lock).
CUSTOMIZE = r"""
set -eu
useradd --create-home --shell /bin/bash --groups sudo pi
passwd --lock pi
install -d -m 0700 -o pi -g pi /home/pi/.ssh
echo 'pi ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/010_pi-nopasswd
chmod 0440 /etc/sudoers.d/010_pi-nopasswd
rm -f /etc/ssh/ssh_host_*
install -d /etc/systemd/system/ssh.service.d
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
  > /etc/systemd/system/ssh.service.d/lab-host-keys.conf
printf 'PasswordAuthentication no\nUseDNS no\n' > /etc/ssh/sshd_config.d/lab.conf
# The VM's lowered ulimits: pam_limits may fail to apply a limit, which must not deny a login.
sed -i 's/^session\s\+required\s\+pam_limits.so/session optional pam_limits.so/' \
  /etc/pam.d/sshd /etc/pam.d/sudo /etc/pam.d/sudo-i /etc/pam.d/su /etc/pam.d/runuser
systemctl enable ssh.service
for unit in getty@tty1.service console-getty.service systemd-remount-fs.service \
            apt-daily.timer apt-daily-upgrade.timer; do
  systemctl mask "$unit"
done
: > /etc/machine-id
rm -f /var/cache/apt/archives/*.deb
"""  # noqa: E501
# arm64 stand-ins also carry Raspberry Pi OS's own disk swap, dphys-swapfile, on as there, with
# Pi OS's 100 MiB (Debian's default is twice the RAM: the workstation's, in a container). Its
# swapon cannot happen in a container (swap is the host kernel's, and no CAP_SYS_ADMIN): the
# lab's drop-in lets that one step fail, so the unit is active with /var/swap made, as on a Pi
# whose swap the zram role then has to turn off.
ARM64_PACKAGES = ("dphys-swapfile",)
ARM64_CUSTOMIZE = r"""
set -eu
sed -i 's/^#\?CONF_SWAPSIZE=.*/CONF_SWAPSIZE=100/' /etc/dphys-swapfile
install -d /etc/systemd/system/dphys-swapfile.service.d
printf '[Service]\nExecStart=\nExecStart=/sbin/dphys-swapfile setup\nExecStart=-/sbin/dphys-swapfile swapon\n' \
  > /etc/systemd/system/dphys-swapfile.service.d/lab-no-swapon.conf
systemctl enable dphys-swapfile.service
rm -f /var/cache/apt/archives/*.deb
"""  # noqa: E501
# Link caps (tc's token bucket filter): each stand-in's link, both ways, and the workstation's
# uplink into the lab. "0" switches a cap off. This kernel has no sch_netem: no added delay.
LINK_RATE = os.environ.get("LAB_LINK_RATE", "100mbit")
UPLINK_RATE = os.environ.get("LAB_UPLINK_RATE", "100mbit")
RUN_OPTIONS = (
    "--systemd=always",
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
    # Pi-like: a few hundred MiB are plenty for systemd, sshd and the agent.
    "--memory=768m",
    "--pids-limit=1024",
)


class LabError(RuntimeError):
    """A lab step that failed; the message says which and why."""


class InitDied(LabError):
    """A stand-in's PID 1 exited while it booted."""


def sh(cmd: list[str], *, check: bool = True, stdin: str | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its stderr."""
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def podman(*args: str, check: bool = True, stdin: str | None = None) -> str:
    """``podman`` with the runtime these machines need (crun refuses their cgroup layout)."""
    return sh(["podman", "--runtime", "runc", *args], check=check, stdin=stdin)


def recipe_key(arch: str = "amd64") -> str:
    """What the root file system is made from; a changed recipe means a fresh tarball. The
    amd64 recipe is the lab's first one (its key unchanged); others add their arch and extras."""
    recipe = [SUITE, MIRROR, *PACKAGES, CUSTOMIZE]
    if arch == "arm64":
        recipe += [arch, *ARM64_PACKAGES, ARM64_CUSTOMIZE]
    return hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:12]


def image_name(arch: str = "amd64") -> str:
    """``localhost/pidistill-lab:bookworm`` for amd64 (molecule's image), ``...-arm64`` else."""
    return IMAGE if arch == "amd64" else f"{IMAGE}-{arch}"


def rootfs_tarball(arch: str = "amd64") -> Path:
    """The cached root file system, made by debootstrap the first time (~2 min; arm64, under
    qemu-user, much longer)."""
    key = recipe_key(arch)
    stem = f"rootfs-{SUITE}-" if arch == "amd64" else f"rootfs-{SUITE}-{arch}-"
    tarball = CACHE / f"{stem}{key}.tar"
    if tarball.is_file():
        return tarball
    for tool in ("debootstrap", "podman"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool}: not installed (apt-get install podman runc debootstrap)")
    packages = PACKAGES + (ARM64_PACKAGES if arch == "arm64" else ())
    extra = ["--arch", arch] if arch != NATIVE else []
    if arch != NATIVE:
        print(f"lab: {ensure_binfmt()}", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"lab: debootstrap {SUITE} {arch} (once, ~2 min native, longer under qemu)",
              file=sys.stderr)  # fmt: skip
        started = time.monotonic()
        sh(
            [
                "debootstrap",
                "--variant=minbase",
                *extra,
                f"--include={','.join(packages)}",
                SUITE,
                str(rootfs),
                MIRROR,
            ]
        )
        sh(["chroot", str(rootfs), "/bin/sh", "-c", CUSTOMIZE])
        if arch == "arm64":
            sh(["chroot", str(rootfs), "/bin/sh", "-c", ARM64_CUSTOMIZE])
        partial = tarball.with_suffix(".tar.part")
        sh(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
        partial.replace(tarball)
        print(f"lab: {tarball.name} made in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for stale in CACHE.glob(f"{stem}*.tar"):
        # rootfs-bookworm-<key>.tar only: the amd64 stem also prefixes the arm64 tarballs.
        if stale != tarball and len(stale.name) == len(tarball.name):
            stale.unlink()
    return tarball


def image_key(image: str = IMAGE) -> str | None:
    """The recipe key of the imported image, or ``None`` when there is none."""
    out = podman("image", "inspect", "--format", "{{json .Labels}}", image, check=False)
    if not out.strip():
        return None
    return (json.loads(out) or {}).get(f"{LABEL}.key")


def ensure_image(arch: str = "amd64") -> str:
    """Import the root file system as the lab image unless the same recipe is already there."""
    image = image_name(arch)
    key = recipe_key(arch)
    current = image_key(image)
    if current == key:
        return image
    tarball = rootfs_tarball(arch)
    if current is not None:  # an older recipe's image would be left behind untagged
        podman("rmi", "--force", image)
    podman(
        "import",
        "--arch", arch,
        "--change", 'CMD ["/sbin/init"]',
        "--change", "STOPSIGNAL=SIGRTMIN+3",
        "--change", f"LABEL {LABEL}=1",
        "--change", f"LABEL {LABEL}.key={key}",
        str(tarball),
        image,
    )  # fmt: skip
    return image


def ssh_key() -> Path:
    """The lab's generated key pair (private half returned), made once per lab."""
    key = CACHE / "ssh" / "id_ed25519"
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pidistill-lab", "-f", str(key)])
    return key


def containers() -> list[str]:
    """Names of the lab's containers, running or not, in host order."""
    out = podman("ps", "-a", "--filter", f"label={HOST_LABEL}", "--format", "{{.Names}}")
    return sorted(out.split(), key=lambda name: int(name.rsplit("-", 1)[-1]))


def network_exists() -> bool:
    """Whether the lab's podman network is there."""
    return subprocess.run(["podman", "network", "exists", NETWORK], check=False).returncode == 0


def host_name(container: str) -> str:
    """``pidistill-pi-2`` -> ``pi-2``: the inventory name and the container's hostname."""
    return container.removeprefix("pidistill-")


def address(container: str) -> str:
    """The stand-in's IP address on the lab network (the workstation routes to it directly)."""
    out = podman(
        "inspect", "--format",
        f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}', container,
    ).strip()  # fmt: skip
    if not out or out == "<no value>":
        raise LabError(f"{container}: no address on the {NETWORK} network")
    return out


def agent_url(container: str) -> str:
    """``https://<address>:8470``: where the workstation (and the other stand-ins) reach pi-agent
    (its certificate, from the fleet's CA, covers the address)."""
    return f"https://{address(container)}:{AGENT_PORT}"


def ssh_args(key: Path, host: str) -> list[str]:
    """An ``ssh`` command line to ``pi`` on a stand-in (lab only: host keys are not checked)."""
    return [
        "ssh",
        "-i", str(key),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=5",
        f"pi@{host}",
    ]  # fmt: skip


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


def tc_cap(device: str, rate: str, netns_pid: int | None = None) -> None:
    """Cap ``device``'s egress at ``rate`` with a token bucket (``0``: remove the cap)."""
    enter = ["nsenter", "-t", str(netns_pid), "-n"] if netns_pid else []
    if rate in ("", "0"):
        subprocess.run([*enter, "tc", "qdisc", "del", "dev", device, "root"],
                       capture_output=True, check=False)  # fmt: skip
        return
    # The burst must hold a whole GSO segment (64 KiB on veth) or tbf drops it.
    sh([*enter, "tc", "qdisc", "replace", "dev", device, "root",
        "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"])  # fmt: skip


def host_veth(container: str) -> tuple[str, int]:
    """The workstation's end of a stand-in's link, and the stand-in's PID (for its netns)."""
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", container).strip())
    # "2: eth0@if168: ..." (netlink answers for the netns; /sys would show the workstation's)
    inside = sh(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "dev", "eth0"])
    peer = inside.split(":", 2)[1].strip().partition("@if")[2]
    for line in sh(["ip", "-o", "link", "show"]).splitlines():
        index, name = line.split(":", 2)[:2]
        if peer and index.strip() == peer:
            return name.strip().split("@")[0], pid
    raise LabError(f"{container}: no workstation end of its link (ifindex {peer or '?'})")


def shape(names: list[str], link_rate: str, uplink_rate: str) -> None:
    """Cap every stand-in's link both ways, and the workstation's uplink (the bridge's egress)."""
    bridge = podman("network", "inspect", "--format", "{{.NetworkInterface}}", NETWORK).strip()
    tc_cap(bridge, uplink_rate)
    for name in names:
        veth, pid = host_veth(name)
        tc_cap(veth, link_rate)  # towards the Pi: its downlink
        tc_cap("eth0", link_rate, netns_pid=pid)  # from the Pi: its uplink


def bench_model_lines() -> list[str]:
    """The llama_cpp role's benchmark model: the embedded teacher GGUF, when the venv has it."""
    try:
        from distill.models import ModelError, embedded_teacher_gguf
    except ImportError:  # not the project's venv: the lab works without a benchmark model
        return []
    try:
        model = embedded_teacher_gguf()
    except ModelError:
        return []
    return [
        "    # The workstation's llama.cpp builds (native, OpenBLAS) race on it before seeding.",
        f"    llama_cpp_bench_model: {json.dumps(str(model))}",
    ]


def write_inventory(
    names: list[str], key: Path, link_rate: str, uplink_rate: str,
    specs: list[HostSpec] | None = None,
) -> Path:  # fmt: skip
    """``inventory/lab.yml`` (generated, git-ignored): the stand-ins as a fleet of Pis. Foreign
    architecture stand-ins are named with their arch and board (``lab_arch``, ``lab_board``) and
    not seeded from the workstation's llama.cpp build (another architecture)."""
    specs = specs or [HostSpec("amd64")] * len(names)
    hosts: dict[str, dict[str, object]] = {}
    for n, spec in zip(names, specs, strict=True):
        hostvars: dict[str, object] = {"ansible_host": address(n), "pi_agent_url": agent_url(n)}
        if spec.arch != NATIVE:
            # Under qemu a benchmark is ~10x slower than on the board: a short one still compares.
            hostvars |= {"lab_arch": spec.arch, "lab_board": spec.board,
                         "llama_cpp_seed_from_workstation": False,
                         "llama_cpp_bench_args": ["-p", "64", "-n", "16", "-r", "1"],
                         "llama_cpp_bench_request": {"prompt": 64, "gen": 16}}  # fmt: skip
        hosts[host_name(n)] = hostvars
    lines = [
        "---",
        "# Generated by scripts/lab.py (make lab-up); removed by make lab-down. Do not edit.",
        "all:",
        "  children:",
        "    pis:",
        "      hosts:",
    ]
    for host, hostvars in hosts.items():
        lines.append(f"        {host}: {json.dumps(hostvars)}")
    first = next(iter(hosts))
    lines += [
        "    canary:",
        "      hosts:",
        f"        {first}:",
        "    lab:",
        "      children:",
        "        pis:",
        "  vars:",
        "    ansible_user: pi",
        f"    ansible_ssh_private_key_file: {json.dumps(str(key))}",
        "    # Lab only: the stand-ins make new host keys at every boot.",
        "    ansible_ssh_common_args: >-",
        "      -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        "    ansible_python_interpreter: /usr/bin/python3",
        "    # Containers share the host's kernel: no zram device, read-only /proc/sys.",
        "    zram_kernel: false",
        "    # Same architecture and CPU as the workstation: its llama.cpp build seeds the class.",
        "    llama_cpp_seed_from_workstation: true",
        "    # Stand-ins share two workstation cores: small benchmarks, one thread each.",
        "    pi_agent_threads: 1",
        "    bench_threads: [1]",
        "    bench_n_prompt: 16",
        "    bench_n_gen: 8",
        "    bench_repetitions: 1",
        "    # Their tokens/s swing with whatever else the workstation runs: the canary's gate",
        "    # fails only below a tenth of its expectation (a broken build, not a busy machine).",
        "    model_sync_gate_tolerance: 0.9",
        *bench_model_lines(),
        "    # The lab's link caps (tc tbf; 0: none), for reports.",
        f"    lab_link_rate: {json.dumps(link_rate)}",
        f"    lab_uplink_rate: {json.dumps(uplink_rate)}",
        "",
    ]
    INVENTORY.parent.mkdir(parents=True, exist_ok=True)
    INVENTORY.write_text("\n".join(lines))
    return INVENTORY


def raise_inotify_limits(count: int) -> None:
    """Every stand-in's systemd holds inotify instances of the workstation's user root: the
    default of 128 runs out near 25 stand-ins (systemd then hangs in "initializing"). Raise the
    limits to what ``count`` needs; never lower them."""
    wanted = {"max_user_instances": 128 + 64 * count, "max_user_watches": 65536 * (count + 2)}
    for name, value in wanted.items():
        path = Path("/proc/sys/fs/inotify") / name
        if int(path.read_text()) < value:
            path.write_text(f"{value}\n")


# Ansible's fact cache (ansible.cfg): a stand-in made again is a new machine, perhaps of another
# architecture; facts cached for its name would describe the old one for an hour.
FACTS = ROOT / ".cache" / "ansible-facts"


def forget_facts(names: list[str]) -> None:
    """Drop the cached facts of these stand-ins (files ``<host>`` or ``<prefix>_<host>``)."""
    hosts = {host_name(name) for name in names}
    for path in FACTS.glob("*") if FACTS.is_dir() else ():
        if path.name in hosts or path.name.split("_", 1)[-1] in hosts:
            path.unlink(missing_ok=True)


def up(
    count: int | None = None, link_rate: str = LINK_RATE, uplink_rate: str = UPLINK_RATE,
    arch: str = "",
) -> int:  # fmt: skip
    """Make the stand-ins ``arch`` names (``lab_arch.parse_spec``; ``count`` of them, default
    3, all of the workstation's architecture without ``arch``). Existing ones of the same
    architecture and board are kept, others recreated, extra ones removed; links capped."""
    if count is not None and count < 1:
        raise LabError("--hosts must be at least 1")
    try:
        specs = parse_spec(arch, count)
    except ArchError as err:
        raise LabError(str(err)) from err
    count = len(specs)
    arches = sorted({s.arch for s in specs})
    if any(a != NATIVE for a in arches):
        try:
            print(f"lab: {ensure_binfmt()}", file=sys.stderr)
        except ArchError as err:
            raise LabError(str(err)) from err
    for name in arches:
        ensure_image(name)
    raise_inotify_limits(count)
    key = ssh_key()
    if not network_exists():
        podman("network", "create", "--label", LABEL, NETWORK)
    existing = set(containers())
    wanted = [f"{PREFIX}{i}" for i in range(1, count + 1)]
    for name in sorted(existing - set(wanted)):
        podman("rm", "--force", "--time", "5", name)
    created = started = 0
    for index, (name, spec) in enumerate(zip(wanted, specs, strict=True), start=1):
        if name in existing and host_spec(name) != spec:  # another arch or board: made again
            podman("rm", "--force", "--time", "5", name)
            existing.discard(name)
        if name not in existing:
            forget_facts([name])
            start(index, key, spec)
            created += 1
        elif "running" not in podman("inspect", "--format", "{{.State.Status}}", name):
            podman("start", name)
            started += 1
    for index, spec in enumerate(specs, start=1):
        boot(index, key, spec)
    shape(wanted, link_rate, uplink_rate)
    path = write_inventory(wanted, key, link_rate, uplink_rate, specs)
    kinds = ", ".join(f"{host_name(n)} {s.arch}{'/' + s.board if s.board else ''}"
                      for n, s in zip(wanted, specs, strict=True))  # fmt: skip
    print(f"lab: {count} stand-in Pi(s) up (created {created}, started {started}); links "
          f"{link_rate or '0'} each way, uplink {uplink_rate or '0'}; "
          f"inventory {path.relative_to(ROOT)}; {kinds}")  # fmt: skip
    return 0


def down(keep_image: bool = False) -> int:
    """Remove all the lab made, except the cached root file system tarball."""
    names = containers()
    if names:
        podman("rm", "--force", "--time", "5", *names)
    forget_facts(names)
    if network_exists():
        podman("network", "rm", "--force", NETWORK)
    if not keep_image:
        for image in (image_name("amd64"), image_name("arm64")):
            if image_key(image) is not None:
                podman("rmi", "--force", image)
    shutil.rmtree(CACHE / "ssh", ignore_errors=True)
    INVENTORY.unlink(missing_ok=True)
    print(f"lab: removed {len(names)} container(s), network, key, inventory"
          + ("" if keep_image else ", image"))  # fmt: skip
    return 0


def status() -> int:
    """One line per stand-in: name, address, state."""
    names = containers()
    for name in names:
        state = podman("inspect", "--format", "{{.State.Status}}", name).strip()
        where = address(name) if state == "running" else "-"
        spec = host_spec(name)
        print(f"{host_name(name)}\t{where}\t{state}\t{spec.arch}"
              + (f"/{spec.board}" if spec.board else ""))  # fmt: skip
    if not names:
        print("lab: no stand-in Pis")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="make N stand-in Pis and write inventory/lab.yml")
    p_up.add_argument("--hosts", type=int,
                      default=int(os.environ["N"]) if os.environ.get("N") else None,
                      help="how many stand-ins (default: $N, else as many as --arch names, "
                           "else 3)")  # fmt: skip
    p_up.add_argument("--arch", default=os.environ.get("LAB_ARCH", ""),
                      help="x86_64 (amd64) or arm64 (aarch64, optionally :pi4 or :pi5) for every "
                           "host, or a comma-separated list, one per host (default $LAB_ARCH, "
                           f"else {NATIVE}); arm64 hosts alternate pi4, pi5")  # fmt: skip
    p_up.add_argument("--link-rate", default=LINK_RATE,
                      help="cap of each stand-in's link, each way (tc rate; 0: none; "
                           "default $LAB_LINK_RATE or 100mbit)")  # fmt: skip
    p_up.add_argument("--uplink-rate", default=UPLINK_RATE,
                      help="cap of the workstation's uplink into the lab (default "
                           "$LAB_UPLINK_RATE or 100mbit)")  # fmt: skip
    p_down = sub.add_parser("down", help="remove everything the lab made")
    p_down.add_argument("--keep-image", action="store_true", help="keep the imported image")
    p_image = sub.add_parser("image", help="build (once) and import the stand-in image")
    p_image.add_argument("--arch", default=NATIVE, choices=["amd64", "arm64"],
                         help=f"the image's architecture (default {NATIVE})")  # fmt: skip
    sub.add_parser("status", help="list the stand-ins")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return up(args.hosts, args.link_rate, args.uplink_rate, args.arch)
        if args.command == "down":
            return down(args.keep_image)
        if args.command == "image":
            print(ensure_image(args.arch))
            return 0
        return status()
    except LabError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
