"""The fleet at scale, measured on the lab: model delivery and no-change site.yml against N.

    python scripts/bench_fleet.py                          # N = 4, 8, 16, 32; push, peers, torrent
    python scripts/bench_fleet.py --sizes 4,8 --modes torrent
    make bench-fleet                                       # the same, SIZES=4,8,16,32

One lab of max(N) stand-ins (links capped by scripts/lab.py: 100 Mbit/s each way per stand-in and
for the workstation's uplink) is provisioned once; each measure limits the playbook to the first N
hosts. The model is the embedded teacher's GGUF (SmolLM2-135M-Instruct Q4_1, ~98 MB).

- delivery: deploy.yml's delivery phase only (``--tags model_sync_install``: into every agent's
  store, no switch), after removing the version from the N stores. ``push``: the workstation sends
  it to every board (all at once); ``peers``: the canary gets it from the workstation, then waves
  that double pull it from the boards that hold it (aria2 over HTTP, several sources each);
  ``torrent`` (deploy.yml's default): the canary gets it from the workstation, then all the other
  boards at once over BitTorrent (the canary seeds, each board serves the pieces it has). Bytes are
  read off the lab's links: what left the workstation, what reached the boards. A re-run moves
  nothing.
- site: the wall time of a site.yml run that changes nothing (after one that converges).

Writes ``<out>/fleet.md``, ``fleet.csv`` and ``fleet-delivery.png``, ``fleet-site.png``; prints
the delivery table with the goal line (32 hosts in at most 1.5x the time of 4, with the
peer-assisted default, torrent).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
import lab  # noqa: E402  (scripts/ is not a package)

from distill.records import atomic_write_text  # noqa: E402

CACHE = Path(os.environ.get("PIDISTILL_CACHE_DIR", ROOT / ".cache"))
INVENTORY = ROOT / "inventory" / "lab.yml"
GOAL_RATIO = 1.5
WAVES = [2, 4, 8, 16, 32, 64, 128, 256]
MODES = {
    "push": {"model_sync_sources": [{"type": "push"}], "fleet_batch": ["100%"]},
    "peers": {"model_sync_sources": [{"type": "peers"}, {"type": "push"}], "fleet_batch": WAVES},
    "torrent": {
        "model_sync_sources": [{"type": "torrent"}, {"type": "push"}],
        "fleet_batch": ["100%"],
    },
}
GOAL_MODE = "torrent"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "PIDISTILL_CACHE_DIR": str(CACHE),
    }


def log(message: str) -> None:
    print(f"bench-fleet: {message}", file=sys.stderr, flush=True)


def model_export(out: Path) -> tuple[Path, str, int]:
    """The teacher GGUF laid out as `distill export` writes it: (folder, version, size)."""
    from distill.models import embedded_teacher_gguf

    gguf = embedded_teacher_gguf()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "teacher-Q4_1.gguf"
    if not target.is_file() or target.stat().st_size != gguf.stat().st_size:
        shutil.copyfile(gguf, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
    size = target.stat().st_size
    manifest = {
        "name": "teacher",
        "kind": "decoder",
        "files": [{"quant": "Q4_1", "file": target.name, "bytes": size, "sha256": digest}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out, f"teacher-Q4_1-{digest[:12]}", size


def playbook(name: str, hosts: list[str], *extra: str) -> tuple[float, str]:
    """Run a playbook limited to ``hosts``; returns (seconds, stdout); raises on failure."""
    cmd = [str(BIN / "ansible-playbook"), f"playbooks/{name}", "-i", str(INVENTORY),
           "--limit", ",".join(hosts), *extra]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise SystemExit(f"bench-fleet: {name} on {len(hosts)} hosts failed:\n{tail}")
    return seconds, done.stdout


def changed(stdout: str) -> int:
    """Sum of changed= over the recap."""
    return sum(int(n) for n in re.findall(r"\bchanged=(\d+)", stdout))


def agents() -> dict[str, str]:
    hosts = yaml.safe_load(INVENTORY.read_text())["all"]["children"]["pis"]["hosts"]
    return {host: hostvars["pi_agent_url"] for host, hostvars in hosts.items()}


def agent(host: str, method: str, path: str) -> int:
    """One authenticated request to a stand-in's agent; returns the HTTP status."""
    token = (CACHE / "fleet" / "tokens" / host).read_text().strip()
    request = urllib.request.Request(agents()[host] + path, method=method,
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    # The agents serve HTTPS with certificates of the fleet's CA (the pi_agent role made it).
    tls = ssl.create_default_context(cafile=CACHE / "fleet" / "ca" / "ca.pem")
    try:
        with urllib.request.urlopen(request, timeout=60, context=tls) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def link_bytes(hosts: list[str]) -> tuple[int, int]:
    """(bytes the workstation sent into the lab, bytes the stand-ins received), counters now."""
    bridge = lab.podman("network", "inspect", "--format", "{{.NetworkInterface}}", lab.NETWORK)
    uplink = int(Path(f"/sys/class/net/{bridge.strip()}/statistics/tx_bytes").read_text())
    received = 0
    for host in hosts:
        veth, _ = lab.host_veth(f"{lab.PREFIX}{host.removeprefix('pi-')}")
        received += int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())
    return uplink, received


def delivery(hosts: list[str], mode: str, export: Path, version: str) -> dict[str, float]:
    """Time deploy.yml's delivery phase to ``hosts`` (stores emptied first), then a re-run."""
    for host in hosts:
        status = agent(host, "DELETE", f"/v1/models/{version}")
        if status not in (200, 204, 404):
            raise SystemExit(f"bench-fleet: {host}: cannot remove {version} (HTTP {status})")
    extra = ["--tags", "model_sync_install", "-e", f"fleet_model_dir={export}",
             "-e", json.dumps(MODES[mode])]  # fmt: skip
    up0, rx0 = link_bytes(hosts)
    seconds, _ = playbook("deploy.yml", hosts, *extra)
    up1, rx1 = link_bytes(hosts)
    missing = [h for h in hosts if agent(h, "GET", f"/v1/models/{version}") != 200]
    if missing:
        raise SystemExit(f"bench-fleet: {mode}: {', '.join(missing)} lack {version}")
    rerun_s, out = playbook("deploy.yml", hosts, *extra)
    _, rx2 = link_bytes(hosts)
    return {
        "seconds": seconds,
        "uplink_mb": (up1 - up0) / 1e6,
        "received_mb": (rx1 - rx0) / 1e6,
        "rerun_seconds": rerun_s,
        "rerun_received_mb": (rx2 - rx1) / 1e6,
        "rerun_changed": changed(out),
    }


def chart(path: Path, title: str, ylabel: str, series: dict[str, dict[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hosts (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=os.environ.get("SIZES", "4,8,16,32"),
                        help="fleet sizes to measure (default $SIZES or 4,8,16,32)")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"delivery modes (default {','.join(MODES)})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--no-site", action="store_true", help="skip the no-change site.yml runs")
    parser.add_argument("--no-provision", action="store_true",
                        help="the lab is provisioned already (re-run the measures)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # ansible resolves relative paths from playbooks/
    sizes = sorted({int(n) for n in args.sizes.split(",") if n.strip()})
    modes = [m for m in args.modes.split(",") if m]
    if not sizes or sizes[0] < 2 or any(m not in MODES for m in modes):
        parser.error(f"--sizes: integers of at least 2; --modes: of {', '.join(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    export, version, size = model_export(args.out / "fleet-model")
    log(f"model {version}, {size / 1e6:.1f} MB; lab of {sizes[-1]} stand-ins")
    if lab.up(sizes[-1]):
        return 1
    hosts = list(agents())
    provision_s = 0.0
    if not args.no_provision:
        log(f"provisioning {len(hosts)} stand-ins (once)")
        provision_s, _ = playbook("provision.yml", hosts)
        log(f"provisioned in {provision_s:.0f} s")

    rows: list[dict[str, object]] = []
    for n in sizes:
        for mode in modes:
            log(f"delivery, {mode}, N={n}")
            result = delivery(hosts[:n], mode, export, version)
            rows.append({"measure": "delivery", "mode": mode, "hosts": n, **result})
            log(f"  {result['seconds']:.1f} s, uplink {result['uplink_mb']:.0f} MB, "
                f"re-run moved {result['rerun_received_mb']:.2f} MB")  # fmt: skip
    if not args.no_site:
        extra = [
            "-e",
            f"fleet_model_dir={export}",
            "-e",
            f"bench_results_dir={args.out / 'fleet-results'}",
        ]
        for n in sizes:
            log(f"site.yml, N={n}: converge, then a run that changes nothing")
            playbook("site.yml", hosts[:n], *extra)
            seconds, out = playbook("site.yml", hosts[:n], *extra)
            rows.append({"measure": "site-no-change", "mode": "", "hosts": n,
                         "seconds": seconds, "rerun_changed": changed(out)})  # fmt: skip
    return report(args.out, rows, size, provision_s, len(hosts))


def report(out: Path, rows: list[dict[str, object]], size: int, provision_s: float,
           lab_hosts: int) -> int:  # fmt: skip
    fields = ["measure", "mode", "hosts", "seconds", "uplink_mb", "received_mb", "rerun_seconds",
              "rerun_received_mb", "rerun_changed"]  # fmt: skip
    table = io.StringIO()
    writer = csv.DictWriter(table, fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "fleet.csv", table.getvalue())

    def fmt(value: object, digits: int = 1) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        f"Lab: {lab_hosts} stand-ins on one 2-core workstation, links {lab.LINK_RATE} each way, "
        f"uplink {lab.UPLINK_RATE}; model {size / 1e6:.0f} MB; first provision.yml "
        + (f"{provision_s:.0f} s." if provision_s else "not in this run."),
        "",
        "| measure | mode | N | seconds | MB from workstation | MB received | re-run s | "
        "re-run MB | re-run changed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['measure']} | {row['mode']} | {row['hosts']} | {fmt(row['seconds'])} | "
            f"{fmt(row.get('uplink_mb', ''), 0)} | {fmt(row.get('received_mb', ''), 0)} | "
            f"{fmt(row.get('rerun_seconds', ''))} | {fmt(row.get('rerun_received_mb', ''), 2)} | "
            f"{row.get('rerun_changed', '')} |"
        )
    peers = {r["hosts"]: r["seconds"] for r in rows if r["measure"] == "delivery"
             and r["mode"] == GOAL_MODE}  # fmt: skip
    goal = ""
    if 4 in peers and 32 in peers:
        ratio = float(peers[32]) / float(peers[4])  # type: ignore[arg-type]
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        goal = (f"Goal ({GOAL_MODE}): 32 hosts in at most {GOAL_RATIO}x the time of 4: "
                f"{peers[32]:.1f} s / {peers[4]:.1f} s = {ratio:.2f}x, {verdict}.")  # fmt: skip
        lines += ["", goal]
    atomic_write_text(out / "fleet.md", "\n".join(lines) + "\n")
    series = {
        mode: {int(r["hosts"]): float(r["seconds"]) for r in rows  # type: ignore[arg-type]
               if r["measure"] == "delivery" and r["mode"] == mode}
        for mode in MODES
    }  # fmt: skip
    chart(out / "fleet-delivery.png", "Model delivery", "seconds",
          {m: s for m, s in series.items() if s})  # fmt: skip
    site = {int(r["hosts"]): float(r["seconds"]) for r in rows if r["measure"] == "site-no-change"}  # type: ignore[arg-type]
    if site:
        chart(out / "fleet-site.png", "site.yml, nothing to change", "seconds", {"site.yml": site})
    print("\n".join(lines))
    print(f"\nbench-fleet: {out / 'fleet.md'}, {out / 'fleet.csv'}, {out / 'fleet-delivery.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
