"""What a board may serve and how: an upload off the allowlist (written by model_sync) is refused
until a rollout lists it, and the held-out prompts that need JSON get schema-valid answers
through ``response_format``.

Tests of the lab modules run in the order the fleet conftest gives (``LAB_ORDER``) and
share one lab (the session's ``lab`` fixture, three hosts: pi-1 is the canary).
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
from fleet_helpers import ROOT, run, version_of
from lab_helpers import agent_call, allowlist, delivery, fleet_tls, holds, lab_hosts, token

pytestmark = pytest.mark.slow


LAB_JSON_MAX_TOKENS = 1024  # the agent's ceiling, above the longest answer bounded() allows

LAB_FREE_MAX_TOKENS = 256  # the answers without response_format are measured, not asserted


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
