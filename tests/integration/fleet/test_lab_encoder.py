"""The encoder on the lab: site.yml deploys the MiniLM export beside the student
(``-e fleet_encoder_dir``), every stand-in Pi then embeds two sentences over HTTPS as
transformers' mean pooling does on the workstation (cosine 0.999 or more), its allowlist names
the encoder, and a second run changes nothing, not even the allowlist after a first run that
pruned older versions (a full test session deploys several before this one).

Shares the session's lab with the other test_lab_* modules (three stand-ins, pi-1 the
canary); alone, it brings the lab up itself.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import pytest
import yaml
from fleet_helpers import ROOT, lab_module, recap, run, version_of

pytestmark = pytest.mark.slow

PLAYBOOK = str(ROOT / ".venv" / "bin" / "ansible-playbook")
HOSTS = ["pi-1", "pi-2", "pi-3"]
SENTENCES = ["The cat sleeps on the warm windowsill.", "Il neige sur Montréal depuis ce matin."]


def agent(inventory: Path, host: str, path: str, body: dict | None = None) -> dict:
    """GET (or POST ``body`` to) an agent endpoint at the stand-in's lab address, over HTTPS
    verified against the fleet's CA alone."""
    hostvars = yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"][host]
    token = (ROOT / ".cache" / "fleet" / "tokens" / host).read_text().strip()
    request = urllib.request.Request(
        hostvars["pi_agent_url"] + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=ROOT / ".cache" / "fleet" / "ca" / "ca.pem")
    with urllib.request.urlopen(request, timeout=60, context=context) as response:
        return json.loads(response.read())


def allowlist(inventory: Path, host: str) -> set[str]:
    """The sha256s a board's allowlist names (read over SSH)."""
    hostvars = yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"][host]
    argv = lab_module().ssh_args(ROOT / ".cache" / "lab" / "ssh" / "id_ed25519",
                                 hostvars["ansible_host"])  # fmt: skip
    text = run([*argv, "sudo", "-n", "cat", "/etc/pi-agent/allowlist"], timeout=60).stdout
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


def test_site_deploys_the_encoder_and_every_board_embeds_as_transformers_does(
    lab: Path,
    student_export: Path,
    encoder_export: Path,
    encoder_cosines,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    results = tmp_path_factory.mktemp("results")
    cmd = [PLAYBOOK, "playbooks/site.yml", "-i", str(lab), "--skip-tags", "bench",
           "-e", f"fleet_model_dir={student_export}", "-e", f"fleet_encoder_dir={encoder_export}",
           "-e", f"bench_results_dir={results}"]  # fmt: skip
    first = recap(run(cmd, timeout=1800).stdout)
    assert set(first) == set(HOSTS)
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in first.values()), first
    version = version_of(encoder_export)
    sha256 = json.loads((encoder_export / "manifest.json").read_text())["files"][0]["sha256"]
    measured = {}
    for host in HOSTS:
        listing = agent(lab, host, "/v1/encoder/models")["data"]
        assert [m["version"] for m in listing if m["active"]] == [version], listing
        answer = agent(lab, host, "/v1/embeddings", {"input": SENTENCES})
        vectors = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
        measured[host] = encoder_cosines(SENTENCES, vectors)
        assert min(measured[host]) >= 0.999, (host, measured[host])
        assert sha256 in allowlist(lab, host)
        # the student still serves completions beside the encoder
        assert agent(lab, host, "/v1/status")["model"]["version"] == version_of(student_export)
    shown = [f"{host} {', '.join(f'{c:.6f}' for c in cos)}" for host, cos in measured.items()]
    print(f"cosine with transformers mean pooling: {'; '.join(shown)}")

    again = run(cmd, timeout=1800).stdout
    second = recap(again)
    assert changed_tasks(again) == []
    assert set(second) == set(HOSTS)
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in second.values()), second


def changed_tasks(output: str) -> list[str]:
    """The ``TASK [...]`` header of every ``changed:`` line of a playbook's output."""
    task, found = "", []
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line.split("]")[0] + "]"
        elif line.startswith("changed:"):
            found.append(f"{task} {line[:120]}")
    return found
