"""Property-based fuzzing of the agent's OpenAPI schema with schemathesis: valid and invalid
requests (at least 1,000 in all) against an agent serving the tiny GGUF; no answer may be a 5xx.

``POST /v1/bench`` is left out: a valid request may ask for minutes of llama-bench (it is tested
with small parameters in test_pi_agent_serving.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from pi_agent.openapi import document
from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
EXAMPLES = {"positive": 45, "negative": 20}
SKIP = {("POST", "/v1/bench")}


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory, llama_tools, pi_agent_tiny_gguf, pi_agent_encoder_gguf
) -> Iterator[AgentProcess]:
    base = tmp_path_factory.mktemp("fuzz")
    store = ModelStore(base / "state" / "models")
    store.recover()
    store.install_file("tiny", pi_agent_tiny_gguf)
    store.switch("tiny")
    config = {
        "llama": {"bin_dir": llama_tools.bin},
        "decoder": {
            "ctx_size": 2048,
            "threads": 1,
            "batch_size": 256,
            "ubatch_size": 256,
            "cache_reuse": 0,
            "parallel": 1,
        },
        "encoder": {"enabled": True, "model": pi_agent_encoder_gguf, "threads": 1},
        "store": {"free_space_margin_mib": 0, "download_timeout_s": 2.0, "keep_versions": 2},
        "metrics": {"vcgencmd": ""},
    }
    with AgentProcess(base, config) as proc:
        proc.wait_for(lambda: proc.request("GET", "/readyz")[0] == 200, timeout=60)
        yield proc


def test_schema_fuzzing_finds_no_server_error(agent: AgentProcess) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(document())
    auth = agent.headers()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIP:
            continue
        for mode, examples in EXAMPLES.items():

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
            def check(case) -> None:
                headers = {**(case.headers or {}), **auth}
                response = case.call(base_url=agent.url, headers=headers, timeout=60)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> "
                        f"{response.status_code}: {response.text[:200]}"
                    )

            try:
                check()
            except Unsatisfiable:
                if mode == "positive":
                    raise  # only an operation without inputs has no invalid form
    total = sum(statuses.values())
    print(f"schemathesis: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(sorted(set(failures))[:10])
    assert total >= 1000
    assert agent.request("GET", "/readyz")[0] == 200  # still serving afterwards
