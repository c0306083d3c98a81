"""The fleet half of the demo: the lab up, site.yml on it with the exported student, the report.

    python scripts/fleet_demo.py                                  # 3 stand-ins, runs/demo/dist
    python scripts/fleet_demo.py --hosts 2 --model-dir runs/x/dist
    python scripts/fleet_demo.py --down                           # and remove the lab at the end

Needs the export folder (``distill export`` wrote it) and the llama.cpp build (``make llamacpp``):
the stand-ins share the workstation's architecture, so its build seeds them. Prints where the
fleet report, the agents (HTTPS), their tokens and the fleet's CA are. Exit status:
ansible-playbook's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "PIDISTILL_CACHE_DIR": os.environ.get("PIDISTILL_CACHE_DIR", str(ROOT / ".cache")),
    }


def _agents(inventory: Path) -> dict[str, str]:
    hosts = yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"]
    return {host: hostvars.get("pi_agent_url", "") for host, hostvars in hosts.items()}


def main(argv: list[str] | None = None) -> int:
    """Lab up, site.yml with the export, a summary; returns ansible-playbook's exit status."""
    parser = argparse.ArgumentParser(prog="fleet_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3, help="stand-in Pis (default 3)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "demo" / "dist",
                        help="the export folder to deploy (default runs/demo/dist)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="where results/<host>/ and the fleet report go")  # fmt: skip
    parser.add_argument("--down", action="store_true", help="remove the lab at the end")
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    if not (model_dir / "manifest.json").is_file():
        sys.stderr.write(f"fleet_demo: {model_dir} has no manifest.json: run distill export\n")
        return 2
    env = _env()
    lab = [sys.executable, str(ROOT / "scripts" / "lab.py")]
    if subprocess.run([*lab, "up", "--hosts", str(args.hosts)], env=env, check=False).returncode:
        return 1
    inventory = ROOT / "inventory" / "lab.yml"
    results = args.results.resolve()
    play = subprocess.run(
        [str(BIN / "ansible-playbook"), "playbooks/site.yml", "-i", str(inventory),
         "-e", f"fleet_model_dir={model_dir}", "-e", f"bench_results_dir={results}"],
        cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    tokens = Path(env["PIDISTILL_CACHE_DIR"]) / "fleet" / "tokens"
    ca = Path(env["PIDISTILL_CACHE_DIR"]) / "fleet" / "ca" / "ca.pem"
    lines = [
        "",
        f"fleet: site.yml exit {play.returncode} on {args.hosts} stand-in Pi(s), model {model_dir}",
        f"  report: {results / 'fleet-report.csv'} (TUI), {results / 'fleet-report.md'}, "
        f"{results / 'fleet-report.png'}",
        f"  results per host: {results}/<host>/<timestamp>.csv",
        f"  tokens: {tokens}/<host>  (fleet-tui --inventory {inventory} --token-dir {tokens})",
        f"  the agents' CA: {ca}  (fleet-tui finds it; curl --cacert {ca} <agent>/healthz)",
    ]
    lines += [f"  agent {host}: {url}" for host, url in _agents(inventory).items()]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.down:
        subprocess.run([*lab, "down", "--keep-image"], env=env, check=False)
    return play.returncode


if __name__ == "__main__":
    sys.exit(main())
