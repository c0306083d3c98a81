"""Property-based fuzzing of the agent's OpenAPI schema with schemathesis: valid and invalid
requests (at least 1,000 in all) against an agent serving the tiny GGUF; no answer may be a 5xx
but llama-server's own chat-parser failure on a constrained answer (see OUTPUT_PARSE_FAILURE).
Then random ``Range`` headers against the tiny GGUF's blob: every answer is the file, exactly the
range it names, or a 416.

``POST /v1/bench`` is left out: a valid request may ask for minutes of llama-bench (it is tested
with small parameters in test_pi_agent_serving.py).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator

import pytest

from pi_agent.openapi import document
from pi_agent.store import ModelStore
from pi_agent.testing import AgentProcess

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
# llama-server's own 500 (a 502 from the agent, with its message) when the random tiny model, held
# to a JSON Schema with free strings, emits byte tokens that are no UTF-8 (0xFE): the grammar takes
# them, the chat parser of the pinned build then fails on the output. llama-server's failure,
# reported as one; counted apart, not the agent's 5xx.
OUTPUT_PARSE_FAILURE = "does not match the expected peg-native format"
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
    parse_failures: list[object] = []
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
                if response.status_code == 502 and OUTPUT_PARSE_FAILURE in response.text:
                    parse_failures.append(case.body)
                elif response.status_code >= 500:
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
    print(f"schemathesis: {total} requests, statuses {dict(sorted(statuses.items()))}, "
          f"{len(parse_failures)} of them llama-server's chat parser failing on its own "
          "constrained output")  # fmt: skip
    assert not failures, "\n".join(sorted(set(failures))[:10])
    # Only constrained chats may meet it: the parser fails on nothing else.
    assert all("response_format" in body for body in parse_failures), parse_failures[:3]
    assert total >= 1000
    assert agent.request("GET", "/readyz")[0] == 200  # still serving afterwards


def rfc9110_span(first: str, last: str, size: int) -> tuple[int, int] | int:
    """What RFC 9110 makes of ``bytes=first-last`` on ``size`` bytes: a span, 200 or 416."""
    if not first and not last:
        return 200  # not a range: ignored
    if not first:
        n = int(last)
        return 416 if n == 0 else (max(size - n, 0), size - 1)
    if last and int(last) < int(first):
        return 200  # invalid: ignored
    if int(first) >= size:
        return 416
    return int(first), min(int(last), size - 1) if last else size - 1


def test_random_ranges_get_the_file_or_exactly_the_range(
    agent: AgentProcess, pi_agent_tiny_gguf
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    data = pi_agent_tiny_gguf.read_bytes()
    size = len(data)
    path = f"/v1/blobs/{hashlib.sha256(data).hexdigest()}"
    near = st.integers(0, size + 10).map(str) | st.sampled_from(["", "0", "9" * 30])
    single = st.builds(lambda a, b: (f"bytes={a}-{b}", rfc9110_span(a, b, size)), near, near)
    several = st.builds(lambda a, b: (f"bytes={a}-{b},0-1", 200), near, near)
    garbage = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).filter(
        lambda text: not re.fullmatch(r"(?i)bytes=\d*-\d*", text)
    )

    @settings(
        max_examples=200, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=single | several | garbage.map(lambda text: (text, 200)))
    def check(case: tuple[str, tuple[int, int] | int]) -> None:
        header, expected = case
        status, answer, body = agent.request("GET", path, headers={"Range": header})
        if expected == 200:
            assert (status, body) == (200, data), header
        elif expected == 416:
            assert status == 416 and answer["content-range"] == f"bytes */{size}", header
        else:
            first, last = expected  # type: ignore[misc]
            assert status == 206, (header, status)
            assert answer["content-range"] == f"bytes {first}-{last}/{size}", header
            assert body == data[first : last + 1]

    check()
    assert agent.request("GET", "/readyz")[0] == 200
