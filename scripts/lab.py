"""The lab: stand-in Raspberry Pis, podman containers booted with systemd as PID 1.

    python scripts/lab.py up                # 3 stand-in Pis, inventory/lab.yml written
    python scripts/lab.py up --hosts 2      # or N=2 through `make lab-up`
    python scripts/lab.py image             # only the image (molecule scenarios boot it too)
    python scripts/lab.py image --arch arm64   # the arm64 image and the Pis' device trees
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

The steps live in ``scripts/labkit/`` (image, boot, links, inventory); this is the command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from lab_arch import BOARDS, NATIVE, ArchError, board_tree, ensure_binfmt, parse_spec
from labkit.boot import boot, host_spec, raise_inotify_limits, start
from labkit.common import (
    CACHE,
    INVENTORY,
    LABEL,
    LINK_RATE,
    NETWORK,
    PREFIX,
    ROOT,
    UPLINK_RATE,
    LabError,
    address,
    containers,
    host_name,
    network_exists,
    podman,
    ssh_args,
    ssh_key,
)
from labkit.image import ensure_image, image_key, image_name, recipe_key
from labkit.inventory import forget_facts, write_inventory
from labkit.links import host_veth, shape, tc_cap

# The command line, and the labkit names other scripts and the tests reach through ``lab``.
__all__ = [
    "LINK_RATE", "NETWORK", "PREFIX", "UPLINK_RATE", "address", "down", "forget_facts",
    "host_name", "host_veth", "image_name", "main", "podman", "recipe_key", "ssh_args",
    "status", "tc_cap", "up",
]  # fmt: skip


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
            if args.arch == "arm64":  # what molecule's arm64 scenarios bind at /sys/firmware
                for board in BOARDS:
                    print(f"lab: {board}'s device tree at {board_tree(board, CACHE)}",
                          file=sys.stderr)  # fmt: skip
            return 0
        return status()
    except LabError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
