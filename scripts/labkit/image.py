"""The stand-in image: a Debian bookworm root file system made once by debootstrap (cached as
a tarball keyed by its recipe) and imported into podman, per architecture."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lab_arch import NATIVE, ensure_binfmt

from labkit.common import CACHE, IMAGE, LABEL, LabError, podman, sh

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
# whose swap the zram role then has to turn off. And bookworm's three units with LoadCredential=
# load none: systemd's credentials step fails under qemu-user (status 243/CREDENTIALS, though
# both tools succeed in a plain arm64 chroot), which left every arm64 stand-in "degraded".
ARM64_PACKAGES = ("dphys-swapfile",)
ARM64_CUSTOMIZE = r"""
set -eu
sed -i 's/^#\?CONF_SWAPSIZE=.*/CONF_SWAPSIZE=100/' /etc/dphys-swapfile
install -d /etc/systemd/system/dphys-swapfile.service.d
printf '[Service]\nExecStart=\nExecStart=/sbin/dphys-swapfile setup\nExecStart=-/sbin/dphys-swapfile swapon\n' \
  > /etc/systemd/system/dphys-swapfile.service.d/lab-no-swapon.conf
systemctl enable dphys-swapfile.service
for unit in systemd-sysusers systemd-tmpfiles-setup systemd-tmpfiles-setup-dev; do
  install -d "/etc/systemd/system/$unit.service.d"
  printf '[Service]\nLoadCredential=\n' > "/etc/systemd/system/$unit.service.d/lab-no-credentials.conf"
done
rm -f /var/cache/apt/archives/*.deb
"""  # noqa: E501


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
