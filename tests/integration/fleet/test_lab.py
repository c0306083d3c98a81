"""The lab end to end: stand-in Pis over SSH, a stand-in whose systemd dies while booting
(recreated once), site.yml on them (provision, deploy, bench), a second run that changes nothing,
an OpenAI client answered by the deployed student, a corrupt model that stops at the canary (which
rolls back), a host lost mid-run, and a lab-down that leaves nothing.
The held-out prompts that need JSON get schema-valid answers through ``response_format``.
Every agent serves HTTPS with a certificate of the fleet's CA (made on the workstation by the
pi_agent role): the workstation's clients here, Ansible's uri calls and the boards' aria2c verify
it, and clients that do not trust the CA are refused. Each board installs only the sha256s its
allowlist (written by model_sync) names.

Tests in this file run in order and share one lab (the session's ``lab`` fixture, three hosts:
pi-1 is the canary).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from fleet_helpers import (
    LAB,
    ROOT,
    cap_uplink,
    fleet_env,
    foreign_ca,
    lab_module,
    link_counter,
    make_export,
    recap,
    run,
    stand_in_link,
    version_of,
)

pytestmark = pytest.mark.slow

PLAYBOOK = str(ROOT / ".venv" / "bin" / "ansible-playbook")
IMAGE = "localhost/pidistill-lab:bookworm"
HOSTS = ["pi-1", "pi-2", "pi-3"]
LAB_JSON_MAX_TOKENS = 1024  # the agent's ceiling, above the longest answer bounded() allows
LAB_FREE_MAX_TOKENS = 256  # the answers without response_format are measured, not asserted


def lab_hosts(inventory: Path) -> dict[str, dict]:
    return yaml.safe_load(inventory.read_text())["all"]["children"]["pis"]["hosts"]


FLEET_CA = ROOT / ".cache" / "fleet" / "ca"


def token(host: str) -> str:
    return (ROOT / ".cache" / "fleet" / "tokens" / host).read_text().strip()


def fleet_tls() -> ssl.SSLContext:
    """A client context that trusts the fleet's CA alone (the pi_agent role made it)."""
    return ssl.create_default_context(cafile=FLEET_CA / "ca.pem")


def agent_get(inventory: Path, host: str, path: str) -> dict:
    """GET an agent endpoint from the workstation, at the stand-in's address on the lab network,
    over HTTPS verified against the fleet's CA."""
    request = urllib.request.Request(
        lab_hosts(inventory)[host]["pi_agent_url"] + path,
        headers={"Authorization": f"Bearer {token(host)}"},
    )
    with urllib.request.urlopen(request, timeout=30, context=fleet_tls()) as response:
        return json.loads(response.read())


def on_board(inventory: Path, host: str, command: str, stdin: str | None = None) -> str:
    """Run a shell command as root on a stand-in over SSH; its standard output."""
    argv = lab_module().ssh_args(ROOT / ".cache" / "lab" / "ssh" / "id_ed25519",
                                 lab_hosts(inventory)[host]["ansible_host"])  # fmt: skip
    done = subprocess.run([*argv, "sudo", "-n", "sh", "-c", shlex.quote(command)], input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, f"{host}: {command}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def allowlist(inventory: Path, host: str) -> set[str]:
    """The sha256s a board's allowlist names."""
    text = on_board(inventory, host, "cat /etc/pi-agent/allowlist")
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


def active_version(inventory: Path, host: str) -> str | None:
    data = agent_get(inventory, host, "/v1/models")["data"]
    return next((m["version"] for m in data if m["active"]), None)


def site(inventory: Path, export: Path, results: Path, *extra: str) -> list[str]:
    return [PLAYBOOK, "playbooks/site.yml", "-i", str(inventory), "-e", f"fleet_model_dir={export}",
            "-e", f"bench_results_dir={results}", *extra]  # fmt: skip


def test_every_stand_in_answers_ssh_as_pi_with_sudo(lab) -> None:
    key = ROOT / ".cache" / "lab" / "ssh" / "id_ed25519"
    hosts = lab_hosts(lab)
    assert sorted(hosts) == HOSTS
    addresses = {hostvars["ansible_host"] for hostvars in hosts.values()}
    assert len(addresses) == len(hosts)
    for name, hostvars in hosts.items():
        # Each on the lab's own network, reached directly (no port published on the workstation).
        address = ipaddress.ip_address(hostvars["ansible_host"])
        assert address.is_private and not address.is_loopback
        assert hostvars["pi_agent_url"] == f"https://{address}:8470"
        done = subprocess.run(
            ["ssh", "-i", str(key), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             f"pi@{address}", "hostname && sudo -n id -u && systemctl is-system-running"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout.split() == [name, "0", "running"], done.stderr


def test_a_stand_in_whose_systemd_dies_while_booting_is_recreated_once(
    lab, capsys: pytest.CaptureFixture[str]
) -> None:
    lab_py = lab_module()
    key = lab_py.ssh_key()
    name = lab_py.start(9, key)  # a spare stand-in, outside the inventory
    try:
        first = subprocess.run(["podman", "--runtime", "runc", "inspect", "--format",
                                "{{.Id}} {{.State.Pid}}", name], capture_output=True, text=True,
                               check=True).stdout.split()  # fmt: skip
        os.kill(int(first[1]), signal.SIGKILL)  # its systemd, before sshd is up
        lab_py.boot(9, key)
        assert "its systemd (PID 1) is gone while booting" in capsys.readouterr().err
        assert lab_py.init_alive(name)
        again = subprocess.run(
            ["podman", "--runtime", "runc", "inspect", "--format", "{{.Id}}", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert again != first[0]  # a new container, not the dead one
    finally:
        subprocess.run(["podman", "--runtime", "runc", "rm", "--force", "--time", "1", name],
                       capture_output=True, check=False)  # fmt: skip


def test_site_serves_and_benchmarks_the_lab_and_a_second_run_changes_nothing(
    lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from distill import llamacpp

    llamacpp.require_tools()  # seeds the stand-ins' class
    results = tmp_path_factory.mktemp("results")
    cmd = site(lab, student_export, results)
    started = time.monotonic()
    first = recap(run(cmd, timeout=1200).stdout)
    first_s = time.monotonic() - started
    assert set(first) == set(HOSTS)
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in first.values()), first
    assert all(c["changed"] > 0 for c in first.values())
    version = version_of(student_export)
    installed = {h: agent_get(lab, h, f"/v1/models/{version}")["created"] for h in HOSTS}
    assert {h: active_version(lab, h) for h in HOSTS} == dict.fromkeys(HOSTS, version)
    for host in HOSTS:
        assert len(list((results / host).glob("*.csv"))) == 1
    report = (results / "fleet-report.csv").read_text().splitlines()
    assert report[0].startswith("host,board,model,quant,threads,pp_tok_s,tg_tok_s")
    assert sorted(line.split(",")[0] for line in report[1:]) == HOSTS
    assert (results / "fleet-report.md").is_file() and (results / "fleet-report.png").is_file()

    # The fleet's CA and a certificate per host, made on the workstation; the keys stay 0600.
    pki = {path.name: path.read_bytes() for path in sorted(FLEET_CA.rglob("*.*"))}
    made = {"ca.pem", "ca.key"} | {f"{host}.{ext}" for host in HOSTS for ext in ("pem", "key")}
    assert made <= set(pki)
    assert {oct(p.stat().st_mode & 0o777) for p in FLEET_CA.rglob("*.key")} == {"0o600"}
    assert oct(FLEET_CA.stat().st_mode & 0o777) == "0o700"

    second = recap(run(cmd, timeout=1200).stdout)
    assert {host: counts["changed"] for host, counts in second.items()} == dict.fromkeys(HOSTS, 0)
    # Nothing moved: the same version, installed at the same moment, on every board.
    assert {h: agent_get(lab, h, f"/v1/models/{version}")["created"] for h in HOSTS} == installed
    # Neither the CA nor any host's key or certificate was made again.
    assert {path.name: path.read_bytes() for path in sorted(FLEET_CA.rglob("*.*"))} == pki
    print(f"site.yml first run {first_s:.0f} s")


def test_an_openai_client_gets_text_from_the_deployed_student(
    lab: Path, student_export: Path
) -> None:
    import httpx
    import openai

    url = lab_hosts(lab)["pi-2"]["pi_agent_url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token("pi-2"), timeout=60,
                           http_client=httpx.Client(verify=fleet_tls()))  # fmt: skip
    assert version_of(student_export) in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(
        model=version_of(student_export),
        messages=[{"role": "user", "content": "Bonjour! Comment ça va?"}],
        max_tokens=8,
    )
    assert answer.choices[0].message.content.strip()


def tls_peer(address: str, context: ssl.SSLContext) -> dict:
    """The certificate an agent presents, once ``context`` verified it (else an ``SSLError``)."""
    import socket

    with (
        socket.create_connection((address, 8470), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=address) as conn,
    ):
        return conn.getpeercert()


def test_the_agents_speak_https_only_to_clients_that_trust_the_fleet_ca(
    lab: Path, tmp_path: Path
) -> None:
    other = ssl.create_default_context(cafile=foreign_ca(tmp_path))
    for host, hostvars in lab_hosts(lab).items():
        address = hostvars["ansible_host"]
        # Trusted: the certificate names the host as the inventory and the clients know it.
        names = {value for _, value in tls_peer(address, fleet_tls())["subjectAltName"]}
        assert {host, address, "127.0.0.1", "localhost"} <= names, names
        # Refused: the system's CAs, and another fleet's CA.
        for context in (ssl.create_default_context(), other):
            with pytest.raises(ssl.SSLCertVerificationError):
                tls_peer(address, context)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(hostvars["pi_agent_url"] + "/healthz", timeout=30)
        # Plain HTTP to the agent gets no answer (the token would cross the network in clear).
        plain = hostvars["pi_agent_url"].replace("https://", "http://") + "/healthz"
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(plain, timeout=30)
        # What the role wrote: HTTPS, no plain-HTTP switch, the allowlist.
        config = tomllib.loads(on_board(lab, host, "cat /etc/pi-agent/agent.toml"))
        assert config["agent"]["tls_cert"] == "/etc/pi-agent/tls.pem"
        assert config["agent"]["tls_ca"] == "/etc/pi-agent/fleet-ca.pem"
        assert config["agent"]["allow_plain_http"] is False
        assert config["store"]["allowlist_file"] == "/etc/pi-agent/allowlist"
        modes = on_board(lab, host, "stat -c '%n %a %U %G' /etc/pi-agent/tls.key")
        assert modes.split() == ["/etc/pi-agent/tls.key", "640", "root", "pi-agent"]


def agent_call(
    inventory: Path,
    host: str,
    method: str,
    path: str,
    data: bytes | None = None,
    ctype: str = "application/json",
    timeout: float = 300,
) -> tuple[int, dict]:
    """One request to an agent from the workstation; the status and the JSON answer."""
    request = urllib.request.Request(
        lab_hosts(inventory)[host]["pi_agent_url"] + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token(host)}", "Content-Type": ctype},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=fleet_tls()) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def bounded(schema: dict, chars: int = 60, items: int = 5) -> dict:
    """``schema`` with a length on every free string and array: whatever a small model writes,
    its answer then ends before max_tokens. An answer valid against it is valid against
    ``schema``, against which it is checked."""
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        if key in ("items", "additionalProperties", "not", "contains"):
            value = bounded(value, chars, items)
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            value = {name: bounded(sub, chars, items) for name, sub in value.items()}
        elif key in ("anyOf", "allOf", "oneOf", "prefixItems") and isinstance(value, list):
            value = [bounded(sub, chars, items) for sub in value]
        out[key] = value
    free = not any(key in schema for key in ("enum", "const", "pattern", "format"))
    if schema.get("type") == "string" and free:
        out.setdefault("maxLength", chars)
    if schema.get("type") == "array":
        out.setdefault("maxItems", items)
    return out


def held_out_json_rows() -> list:
    from distill.records import read_many

    rows = read_many(sorted((ROOT / "dataset").glob("*.jsonl")))
    return [row for row in rows if row.split == "heldout" and row.requires_json]


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, a ready-made model (8k context, unlike the
    student), made an export by ``distill import-gguf`` as a user would (issue 16)."""
    from distill.models import embedded_teacher_gguf

    out = tmp_path_factory.mktemp("teacher") / "dist"
    run([str(ROOT / ".venv" / "bin" / "distill"), "import-gguf", "--gguf",
         str(embedded_teacher_gguf()), "--output-dir", str(out),
         "--name", "smollm2-135m-instruct"], timeout=300)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["source"] == "imported: file", manifest["source"]
    assert [f["quant"] for f in manifest["files"]] == ["Q4_1"], manifest["files"]
    return out


def test_a_model_off_the_allowlist_is_refused_and_a_rollout_lists_it(
    lab: Path, student_export: Path, teacher_export: Path
) -> None:
    """pi-2's allowlist names what the rollouts deployed: an upload of anything else, token and
    all, is a 403 and stores nothing; deploy.yml lists the teacher first and then installs it."""
    manifest = json.loads((teacher_export / "manifest.json").read_text())
    sha, size = manifest["files"][0]["sha256"], manifest["files"][0]["bytes"]
    teacher = version_of(teacher_export)
    listed = allowlist(lab, "pi-2")
    student_sha = json.loads((student_export / "manifest.json").read_text())["files"][0]["sha256"]
    assert student_sha in listed and sha not in listed
    # The upload's head: the agent answers it at once and closes, before any byte of the body.
    address = lab_hosts(lab)["pi-2"]["ansible_host"]
    conn = http.client.HTTPSConnection(address, 8470, context=fleet_tls(), timeout=60)
    try:
        conn.putrequest("PUT", f"/v1/models/{teacher}?sha256={sha}")
        for name, value in (("Authorization", f"Bearer {token('pi-2')}"),
                            ("Content-Type", "application/octet-stream"),
                            ("Content-Length", str(size))):  # fmt: skip
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 403, answer
    assert sha in answer["error"]["message"] and "allowlist" in answer["error"]["message"]
    assert not holds(lab, "pi-2", teacher_export)

    push = ["-e", json.dumps({"model_sync_sources": [{"type": "push"}]})]
    run(delivery(lab, teacher_export, "--limit", "pi-2", *push))
    assert allowlist(lab, "pi-2") == listed | {sha}
    assert holds(lab, "pi-2", teacher_export)


def test_held_out_json_prompts_get_schema_valid_answers_through_response_format(
    lab: Path, student_export: Path, teacher_export: Path, record_property
) -> None:
    """Every held-out prompt that needs JSON, through pi-2's agent with its schema as OpenAI's
    response_format: at least 99% of the answers validate. The share without response_format
    (same prompts, same seed) is reported beside it.

    The lab's student is the random tiny model, whose 512-token context cannot hold these prompts
    (515 to 623 tokens with their schema): pi-2 serves the embedded SmolLM2-135M-Instruct GGUF
    (the teacher, 8k context) for the test, installed by the test before (through deploy.yml, which
    listed it), then switches back to the student (the teacher's version stays installed as the
    previous one). The schemas' free
    strings and arrays are bounded in the request (``bounded``): a 135M model can loop inside a
    string until max_tokens cuts the JSON short.
    """
    import httpx
    import jsonschema
    import openai

    from distill.records import build_messages

    rows = held_out_json_rows()
    assert rows, "no held-out requires_json rows in dataset/"
    teacher = version_of(teacher_export)
    if not holds(lab, "pi-2", teacher_export):  # run alone (-k): install it as the test above does
        push = ["-e", json.dumps({"model_sync_sources": [{"type": "push"}]})]
        run(delivery(lab, teacher_export, "--limit", "pi-2", *push))
    status, answer = agent_call(lab, "pi-2", "POST", f"/v1/models/{teacher}/activate")
    assert status == 200, answer
    url = lab_hosts(lab)["pi-2"]["pi_agent_url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token("pi-2"), timeout=600, max_retries=0,
                           http_client=httpx.Client(verify=fleet_tls(), timeout=600))  # fmt: skip

    def valid(text: str | None, schema: dict) -> bool:
        try:
            jsonschema.validate(json.loads(text or ""), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    held, free, failures = 0, 0, []
    try:
        for row in rows:
            request = {"model": teacher, "messages": build_messages(row),
                       "max_tokens": LAB_JSON_MAX_TOKENS, "seed": 0}  # fmt: skip
            schema = {"name": row.id, "schema": bounded(row.json_schema), "strict": True}
            fmt = {"type": "json_schema", "json_schema": schema}
            choice = client.chat.completions.create(**request, response_format=fmt).choices[0]
            if valid(choice.message.content, row.json_schema):
                held += 1
            else:
                failures.append((row.id, choice.finish_reason, choice.message.content))
            loose = {**request, "max_tokens": LAB_FREE_MAX_TOKENS}
            choice = client.chat.completions.create(**loose).choices[0]
            free += valid(choice.message.content, row.json_schema)
    finally:
        back = version_of(student_export)
        status, answer = agent_call(lab, "pi-2", "POST", f"/v1/models/{back}/activate")
        assert status == 200, answer
    n = len(rows)
    print(f"held-out JSON prompts: {held}/{n} schema-valid with response_format, "
          f"{free}/{n} without")  # fmt: skip
    record_property("json_valid_with_response_format", f"{held}/{n}")
    record_property("json_valid_without_response_format", f"{free}/{n}")
    assert held / n >= 0.99, failures


def test_a_corrupt_model_stops_at_the_canary_which_rolls_back(
    lab: Path, student_export: Path, corrupt_export: Path
) -> None:
    done = run([PLAYBOOK, "playbooks/deploy.yml", "-i", str(lab),
                "-e", f"fleet_model_dir={corrupt_export}"], check=False)  # fmt: skip
    assert done.returncode != 0
    counts = recap(done.stdout)
    assert set(counts) == {"pi-1"}, counts  # the rollout never reached pi-2 and pi-3
    assert counts["pi-1"]["failed"] == 1
    assert "the agent rolled back to " + version_of(student_export) in done.stdout
    # The canary was given the broken version, refused it, and serves the old model again.
    assert version_of(corrupt_export) in [
        m["version"] for m in agent_get(lab, "pi-1", "/v1/models")["data"]
    ]
    assert {h: active_version(lab, h) for h in HOSTS} == dict.fromkeys(
        HOSTS, version_of(student_export)
    )
    assert agent_get(lab, "pi-1", "/readyz")["ready"] is True


def test_a_host_stopped_mid_run_fails_alone_and_is_named_in_the_recap(
    lab: Path, student_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cmd = site(lab, student_export, tmp_path_factory.mktemp("results"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fleet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    stopped = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not stopped and line.startswith("TASK [pi_agent"):
                # Mid-run: provisioning is under way on every host.
                subprocess.run(["podman", "--runtime", "runc", "stop", "--time", "1",
                                "pidistill-pi-3"], check=True, capture_output=True)  # fmt: skip
                stopped = True
        proc.wait(timeout=1200)
        output = "".join(lines)
        assert stopped, output[-3000:]
        counts = recap(output)
        assert counts["pi-3"]["unreachable"] + counts["pi-3"]["failed"] >= 1, counts
        for host in ("pi-1", "pi-2"):
            assert counts[host]["failed"] == 0 and counts[host]["unreachable"] == 0, counts
        assert "PLAY [Benchmark the fleet]" in output  # the others went on to the last stage
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        # Bring pi-3 back (its address may change: the inventory is written again).
        run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)


def delivery(inventory: Path, export: Path, *extra: str) -> list[str]:
    """deploy.yml's delivery phase only: the model into the stores, no switch."""
    return [PLAYBOOK, "playbooks/deploy.yml", "-i", str(inventory), "--tags", "model_sync_install",
            "-e", f"fleet_model_dir={export}", *extra]  # fmt: skip


def background(cmd: list[str]) -> subprocess.Popen:
    """A playbook run in the background, its output (stderr included) on a pipe."""
    return subprocess.Popen(cmd, cwd=ROOT, env=fleet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def holds(inventory: Path, host: str, export: Path) -> bool:
    return version_of(export) in [
        m["version"] for m in agent_get(inventory, host, "/v1/models")["data"]
    ]


PEERS = ["-e", json.dumps({"model_sync_sources": [{"type": "peers"}, {"type": "push"}]})]


def cut_pi1_mid_transfer(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with pi-1's and pi-2's uplinks capped at 16 Mbit/s and take pi-1's link down
    once it sent 1 MB; then the link and the lab's caps come back. Returns (exit status, output)."""
    for host in ("pi-1", "pi-2"):
        cap_uplink(host, "16mbit")
    veth, _ = stand_in_link("pi-1")
    before = link_counter("pi-1")
    proc = background(cmd)
    try:
        deadline = time.monotonic() + 300
        while link_counter("pi-1") - before < 1_000_000:
            assert proc.poll() is None and time.monotonic() < deadline, "pi-1 never sent"
            time.sleep(0.05)
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["ip", "link", "set", veth, "up"], check=False)
        run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)  # caps back
    return proc.returncode, output


def test_boards_pull_from_peers_and_a_source_cut_mid_transfer_is_replaced(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    size = 24_000_000
    export = make_export(tmp_path_factory.mktemp("peers") / "dist",
                         b"GGUF\x03\x00\x00\x00" + os.urandom(size), name="peers")  # fmt: skip
    # The canary gets it from the workstation; pi-2 pulls it from the canary.
    served = link_counter("pi-1")
    done = run(delivery(lab, export, "--limit", "pi-1,pi-2", *PEERS))
    assert "Download the GGUF with aria2, peers" in done.stdout, done.stdout[-3000:]
    assert holds(lab, "pi-1", export) and holds(lab, "pi-2", export)
    assert link_counter("pi-1") - served > size  # pi-1 sent it (to pi-2)

    # pi-3 pulls from both; pi-1's link goes down after its first MB.
    before = link_counter("pi-1")
    returncode, output = cut_pi1_mid_transfer(delivery(lab, export, "--limit", "pi-3", *PEERS))
    assert returncode == 0, output[-4000:]
    assert "Download the GGUF with aria2, peers 2" in output
    assert link_counter("pi-1") - before < size  # cut off before it sent it all: pi-2 did the rest
    assert holds(lab, "pi-3", export)
    # The peer token reached aria2c on its standard input: no settings file holds it.
    for host in ("pi-2", "pi-3"):
        assert on_board(lab, host, "ls /etc/pi-agent").split() == sorted(
            ["agent.toml", "allowlist", "fleet-ca.pem", "peer-token", "tls.key", "tls.pem", "token"]
        )


def test_aria2_on_a_board_gets_a_blob_from_a_peer_only_through_the_fleet_ca(lab: Path) -> None:
    """What the peers source runs, by hand on pi-3 against pi-1's agent: with the fleet's CA the
    blob comes (a dry run: headers only), with the system's CAs the TLS handshake is refused."""
    sha = agent_get(lab, "pi-1", "/v1/models")["data"][0]["sha256"]
    url = f"{lab_hosts(lab)['pi-1']['pi_agent_url']}/v1/blobs/{sha}"
    script = (
        "set -e; t=$(cat /etc/pi-agent/peer-token); "
        "printf '%s\\n  header=Authorization: Bearer %s\\n' " + url + ' "$t" | '
        "aria2c --input-file=- --dry-run=true --max-tries=1 --console-log-level=error "
        "--summary-interval=0 --download-result=hide --dir=/tmp {ca} 2>&1; echo exit=$?"
    )
    trusted = on_board(lab, "pi-3", script.format(ca="--ca-certificate=/etc/pi-agent/fleet-ca.pem"))
    assert trusted.strip().endswith("exit=0"), trusted
    refused = on_board(lab, "pi-3", script.replace("set -e; ", "").format(ca=""))
    assert "exit=0" not in refused and "handshake" in refused.lower(), refused


# The sockets a stand-in listens on (/proc/net/tcp and tcp6, state LISTEN), as (address, port).
LISTENERS = r"""
import ipaddress
for name, size in (("tcp", 4), ("tcp6", 16)):
    for line in open(f"/proc/net/{name}").readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            raw, port = local.split(":")
            packed = b"".join(bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, len(raw), 8))
            print(ipaddress.ip_address(packed[:size]), int(port, 16))
"""


def on_stand_in(host: str, *argv: str) -> str:
    """A command's output inside a stand-in, as root (podman exec: no SSH, no Ansible)."""
    done = subprocess.run(["podman", "--runtime", "runc", "exec", f"pidistill-{host}", *argv],
                          capture_output=True, text=True, env=fleet_env(), check=True)  # fmt: skip
    return done.stdout


def check_swarm_confined(inventory: Path, host: str) -> None:
    """The torrent source's seed and tracker on ``host`` run as the agent's user, unprivileged,
    behind the address allow list, listening on the board's fleet address only."""
    units = on_stand_in(host, "systemctl", "list-units", "--plain", "--no-legend", "pidistill-*")
    names = [line.split()[0] for line in units.splitlines()]
    assert "pidistill-tracker.service" in names
    assert any(name.startswith("pidistill-seed-") for name in names), names
    expected = {"User": "pi-agent", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
                "ProtectSystem": "strict"}  # fmt: skip
    shown_properties = ",".join([*expected, "IPAddressDeny"])
    for name in names:
        shown = on_stand_in(host, "systemctl", "show", name, f"--property={shown_properties}")
        got = dict(line.split("=", 1) for line in shown.splitlines())
        # systemd prints the deny list in either order ("::/0 0.0.0.0/0" on some versions).
        assert set(got.pop("IPAddressDeny", "").split()) == {"0.0.0.0/0", "::/0"}, (name, shown)
        assert got == expected, (name, shown)
    users = on_stand_in(host, "ps", "-o", "user=", "-C", "aria2c,opentracker").split()
    assert users and set(users) == {"pi-agent"}, users
    address = lab_hosts(inventory)[host]["ansible_host"]
    swarm_ports = {6969, *range(6881, 6890)}  # the tracker's and aria2c's (model_sync defaults)
    sockets = on_stand_in(host, "python3", "-c", LISTENERS)
    listening = [line.split() for line in sockets.splitlines()]
    swarm = {(addr, int(port)) for addr, port in listening if int(port) in swarm_ports}
    assert (address, 6969) in swarm, listening
    assert {addr for addr, _ in swarm} == {address}, listening  # not 0.0.0.0, not ::


def test_boards_share_the_model_over_bittorrent_and_a_seed_cut_mid_transfer_is_replaced(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    size = 24_000_000
    export = make_export(tmp_path_factory.mktemp("torrent") / "dist",
                         b"GGUF\x03\x00\x00\x00" + os.urandom(size), name="torrent")  # fmt: skip
    # deploy.yml's default: the canary gets it from the workstation and seeds it; pi-2 downloads
    # it over BitTorrent.
    served = link_counter("pi-1")
    done = run(delivery(lab, export, "--limit", "pi-1,pi-2"))
    assert "Download the GGUF from the swarm, seeds 1" in done.stdout, done.stdout[-3000:]
    assert holds(lab, "pi-1", export) and holds(lab, "pi-2", export)
    assert link_counter("pi-1") - served > size  # pi-1 seeded it (to pi-2)
    assert (export / ".torrents").is_dir()  # the .torrent, made once on the workstation
    # Private (mktorrent -p): clients keep it off DHT and peer exchange.
    (torrent,) = (export / ".torrents").glob("*.torrent")
    assert b"7:privatei1e" in torrent.read_bytes()
    # Seed and tracker (pi-1) confined; pi-2's download ran as the agent's user: the agent moved
    # the file aria2c wrote into its store, owner and all.
    check_swarm_confined(lab, "pi-1")
    stored = f"/var/lib/pi-agent/models/versions/{version_of(export)}/model.gguf"
    assert on_stand_in("pi-2", "stat", "-c", "%U", stored).strip() == "pi-agent"

    # pi-3 downloads from both seeds (pi-1 and pi-2 hold it); pi-1's link goes down after 1 MB.
    before = {host: link_counter(host) for host in ("pi-1", "pi-2")}
    returncode, output = cut_pi1_mid_transfer(delivery(lab, export))
    assert returncode == 0, output[-4000:]
    assert "Download the GGUF from the swarm, seeds 2" in output
    assert link_counter("pi-1") - before["pi-1"] < size  # cut off before it sent it all
    assert link_counter("pi-2") - before["pi-2"] > size / 2  # pi-2 did the rest
    assert holds(lab, "pi-3", export)


def test_boards_killed_mid_rollout_are_named_and_a_rerun_completes_them(
    lab: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = b"GGUF\x03\x00\x00\x00" + os.urandom(24_000_000)
    export = make_export(tmp_path_factory.mktemp("rollout") / "dist", weights, name="rollout")
    cap_uplink("pi-1", "16mbit")  # the wave after the canary takes a few seconds
    sent = link_counter("pi-1")
    proc = background(delivery(lab, export))
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    killed = False
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            # The canary serves the wave (pi-2, pi-3): once it sent 2 MB, pi-3 dies mid-download.
            if not killed and link_counter("pi-1") - sent > 2_000_000:
                subprocess.run(["podman", "--runtime", "runc", "kill", "pidistill-pi-3"],
                               check=True, capture_output=True)  # fmt: skip
                killed = True
            time.sleep(0.05)
        proc.wait(timeout=60)
        reader.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert killed, output[-3000:]
    counts = recap(output)
    assert proc.returncode != 0
    assert counts["pi-3"]["unreachable"] + counts["pi-3"]["failed"] >= 1, counts  # named
    assert all(counts[h]["failed"] == 0 and counts[h]["unreachable"] == 0 for h in ("pi-1", "pi-2"))
    assert holds(lab, "pi-2", export)  # the rest finished

    run([sys.executable, str(LAB), "up", "--hosts", str(len(HOSTS))], timeout=600)  # pi-3 back
    again = recap(run(delivery(lab, export), timeout=900).stdout)
    assert {h: c["failed"] + c["unreachable"] for h, c in again.items()} == dict.fromkeys(HOSTS, 0)
    assert again["pi-1"]["changed"] == again["pi-2"]["changed"] == 0  # nothing moved there
    assert holds(lab, "pi-3", export)


@pytest.mark.lab_down
def test_lab_down_removes_all_it_made(lab) -> None:
    cache = ROOT / ".cache" / "lab"
    tarballs = sorted(cache.glob("rootfs-*.tar"))  # none when the image came from an earlier run
    planted = cache / "rootfs-keep-me.tar"
    planted.write_bytes(b"")  # down must leave the cache alone
    try:
        run([sys.executable, str(LAB), "down"])
        podman = ["podman", "--runtime", "runc"]
        left = subprocess.run(
            [*podman, "ps", "-a", "--filter", "label=pidistill.lab.host", "-q"],
            capture_output=True, text=True, env=fleet_env(), check=True,
        )  # fmt: skip
        assert left.stdout.strip() == ""
        for kind, name in (("network", "pidistill-lab"), ("image", IMAGE)):
            assert subprocess.run([*podman, kind, "exists", name]).returncode != 0, name
        assert not (cache / "ssh").exists()
        assert not lab.exists()
        assert sorted(cache.glob("rootfs-*.tar")) == sorted([*tarballs, planted])
    finally:
        planted.unlink(missing_ok=True)
