"""Structured output: response_format and grammar checked, then turned into llama-server's fields.

The schema check is held to jsonschema's ``check_schema`` (the reference the agent cannot carry
to the Pi) on hand-picked and generated schemas; the API tests run a real agent in front of a
stand-in llama-server that echoes what it receives.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pi_agent.structured import (
    DRAFT_7,
    DRAFT_2020_12,
    MAX_DEPTH,
    ConstraintError,
    SchemaError,
    check_schema,
    for_llama_server,
)
from pi_agent.testing import AgentProcess

ECHO = Path(__file__).with_name("echo_llama_server.py")
FAIL_PROMPT = "fail"  # the stand-in answers it with a 500
ROOT = Path(__file__).resolve().parents[3]
LIMIT = 65536
PERSON = {
    "type": "object",
    "properties": {"nom": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["nom", "age"],
    "additionalProperties": False,
}
CHAT = {"messages": [{"role": "user", "content": "salut"}]}


# The accepted forms and what llama-server receives.


@dataclass(frozen=True)
class Form:
    id: str
    given: dict[str, Any]
    sent: dict[str, Any]  # the fields llama-server receives in place of the given ones


FORMS = [
    Form("openai json_schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}}, {"json_schema": PERSON}),
    Form("bare json_schema", {"response_format": {"type": "json_schema", "schema": PERSON}},
         {"json_schema": PERSON}),
    Form("json_schema without a schema is any object",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         {"json_schema": {}}),
    Form("json_object", {"response_format": {"type": "json_object"}}, {"json_schema": {}}),
    Form("json_object with llama.cpp's schema",
         {"response_format": {"type": "json_object", "schema": PERSON}}, {"json_schema": PERSON}),
    Form("text is no constraint", {"response_format": {"type": "text"}}, {}),
    Form("a grammar", {"grammar": 'root ::= "oui" | "non"'}, {"grammar": 'root ::= "oui" | "non"'}),
]  # fmt: skip


@pytest.mark.parametrize("form", FORMS, ids=[f.id for f in FORMS])
def test_each_form_reaches_llama_server_as_json_schema_or_grammar(form: Form) -> None:
    sent, constrained = for_llama_server({**CHAT, **form.given}, LIMIT)
    assert sent == {**CHAT, **form.sent}
    assert constrained == bool(form.sent)


def test_a_request_without_constraint_passes_unchanged() -> None:
    assert for_llama_server(CHAT, LIMIT) == (CHAT, False)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"grammar": "root ::= x", "response_format": {"type": "json_object"}},
         "grammar and response_format exclude each other"),
        ({"grammar": "root ::= x", "response_format": {"type": "text"}},
         "grammar and response_format exclude each other"),
        ({"response_format": {"type": "json_schema"}}, "needs json_schema"),
        ({"response_format": {"type": "json_schema", "schema": {}, "json_schema": {}}},
         "one of them"),
        ({"response_format": {"type": "text", "schema": {}}}, "type text takes no schema"),
        ({"response_format": {"type": "json_object", "json_schema": {}}},
         "only with type json_schema"),
        ({"response_format": {"type": "json_object", "schema": {"type": "hiccup"}}},
         "response_format.schema.type: must be one of"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
            "properties": {"n": {"minLength": -1}}}}}},
         "response_format.json_schema.schema.properties.n.minLength: must not be negative"),
    ],
    ids=[
        "grammar and a schema",
        "grammar and text",
        "json_schema without a schema",
        "json_schema with two schemas",
        "text with a schema",
        "json_object with OpenAI's wrapper",
        "an unknown type in the schema",
        "a negative minLength, named by its path",
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_what_is_wrong(given: dict, message: str) -> None:
    with pytest.raises(ConstraintError, match=message) as err:
        for_llama_server({**CHAT, **given}, LIMIT)
    assert err.value.status == 400


def test_a_schema_or_grammar_over_the_limit_is_413() -> None:
    big = {"type": "object", "description": "x" * 200}
    size = len(json.dumps(big, separators=(",", ":")))
    for_llama_server({**CHAT, "response_format": {"type": "json_object", "schema": big}}, size)
    with pytest.raises(ConstraintError, match=rf"{size} bytes, over the limit of {size - 1}") as e:
        for_llama_server(
            {**CHAT, "response_format": {"type": "json_object", "schema": big}}, size - 1
        )
    assert e.value.status == 413
    grammar = 'root ::= "é"'  # bytes, not characters, are counted
    for_llama_server({**CHAT, "grammar": grammar}, len(grammar.encode()))
    with pytest.raises(ConstraintError, match="grammar: 13 bytes") as e:
        for_llama_server({**CHAT, "grammar": grammar}, len(grammar))
    assert e.value.status == 413


# The schema check against jsonschema's.


def reference_accepts(schema: Any) -> bool:
    """jsonschema's verdict (its validator_for fails on a $schema that is no string: the
    latest draft's meta-schema says why)."""
    validator: Any = jsonschema.Draft202012Validator
    if isinstance(schema, dict) and isinstance(schema.get("$schema"), str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # an unknown $schema
            validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError:
        return False
    return True


def agent_accepts(schema: Any) -> bool:
    try:
        check_schema(schema)
    except SchemaError:
        return False
    return True


def dataset_schemas() -> list[dict]:
    rows = [json.loads(line) for path in sorted((ROOT / "dataset").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    return [row["json_schema"] for row in rows if row.get("json_schema")]


HAND_PICKED: list[Any] = [
    True, False, {}, PERSON, {"type": ["string", "null"]}, {"type": []}, {"type": ["a"]},
    {"type": ["string", "string"]}, {"type": 5}, {"required": ["a", "a"]}, {"required": "a"},
    {"enum": []}, {"enum": 3}, {"const": None}, {"minimum": "0"}, {"minimum": True},
    {"multipleOf": 0}, {"multipleOf": 0.5}, {"maxLength": 2.0}, {"maxLength": 2.5},
    {"minItems": -1}, {"pattern": "("}, {"pattern": "^[a-z]+$"}, {"patternProperties": {"(": {}}},
    {"patternProperties": {"^x": {"type": "string"}}}, {"properties": {"a": 5}},
    {"properties": []}, {"items": [{"type": "integer"}]}, {"items": {"type": "integer"}},
    {"prefixItems": []}, {"prefixItems": [{}]}, {"anyOf": []}, {"oneOf": [True, {}]},
    {"allOf": {}}, {"not": 5}, {"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"},
    {"$defs": {"a": 1}}, {"definitions": {"a": 1}}, {"dependencies": {"a": ["b"], "c": {}}},
    {"dependencies": {"a": [1]}}, {"dependentRequired": {"a": ["b", "b"]}}, {"$id": "a#b"},
    {"$id": "a#"}, {"$anchor": "9x"}, {"$anchor": "x9"}, {"$vocabulary": {"a": 1}},
    {"unevaluatedProperties": False}, {"x-unknown": {"type": 5}}, {"format": 5},
    {"format": "date"}, {"examples": {}}, {"deprecated": "yes"}, {"contentSchema": 1},
    {"if": {}, "then": 1}, {"$schema": DRAFT_7 + "#", "items": [{"type": "integer"}]},
    {"$schema": DRAFT_7, "prefixItems": 5, "$defs": 5}, {"$schema": DRAFT_7, "items": []},
    {"$schema": DRAFT_2020_12, "items": [{}]}, {"$schema": "https://example.org/s", "items": [{}]},
    {"$schema": 5},
]  # fmt: skip


@pytest.mark.parametrize("schema", HAND_PICKED + dataset_schemas(), ids=json.dumps)
def test_the_check_agrees_with_jsonschema(schema: Any) -> None:
    assert agent_accepts(schema) == reference_accepts(schema)


_scalars = (
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.5, 2.0, -1.5])
    | st.sampled_from(["string", "object", "a", "^a", "(", "#", "a#b", ""])
)  # fmt: skip
_names = st.sampled_from(["a", "b", "nom"])
_counts = st.integers(-1, 4) | st.sampled_from([2.0, 2.5])
_types = st.sampled_from(["string", "integer", "object", "null", "hiccup"])


def _keyword(schema: st.SearchStrategy) -> st.SearchStrategy:
    """(keyword, value) pairs: mostly the right kind of value, sometimes wrong in its details
    (a negative count, a repeated name, a broken regex), a quarter of the time any value."""
    right = {
        "type": _types | st.lists(_types, max_size=3),
        "properties": st.dictionaries(_names, schema, max_size=3),
        "required": st.lists(_names, max_size=3),
        "items": schema | st.lists(schema, max_size=2),
        "prefixItems": st.lists(schema, max_size=2),
        "enum": st.lists(_scalars, max_size=3),
        "const": _scalars,
        "minimum": st.integers(-5, 5) | st.sampled_from([0.5, -2.25]),
        "maxLength": _counts, "minItems": _counts, "maxContains": _counts,
        "pattern": st.sampled_from(["^a", "(", "a{2}", "[", r"\d+"]),
        "patternProperties": st.dictionaries(st.sampled_from(["^a", "(", "x"]), schema, max_size=2),
        "additionalProperties": schema, "not": schema, "if": schema, "then": schema,
        "contains": schema, "propertyNames": schema, "unevaluatedItems": schema,
        "anyOf": st.lists(schema, max_size=3), "allOf": st.lists(schema, max_size=3),
        "oneOf": st.lists(schema, max_size=3),
        "$defs": st.dictionaries(_names, schema, max_size=2),
        "definitions": st.dictionaries(_names, schema, max_size=2),
        "dependencies": st.dictionaries(_names, schema | st.lists(_names | _scalars, max_size=2),
                                        max_size=2),
        "dependentRequired": st.dictionaries(_names, st.lists(_names, max_size=3), max_size=2),
        "multipleOf": st.sampled_from([0, -1, 0.5, 3]),
        "uniqueItems": st.booleans(),
        "format": st.sampled_from(["date", "email"]),
        "title": st.text(max_size=3),
        "$ref": st.sampled_from(["#", "#/$defs/a"]),
        "$anchor": st.sampled_from(["a", "9a", "_x", ""]),
        "$id": st.sampled_from(["a", "a#", "a#b", "#x"]),
        "x-extension": _scalars,
    }  # fmt: skip
    return st.one_of(
        *[st.tuples(st.just(key), value) for key, value in right.items()],
        st.tuples(st.sampled_from(sorted(right)), _scalars | st.lists(_scalars, max_size=2)),
    )


_generated = st.recursive(
    st.booleans() | st.just({}),
    lambda schema: st.lists(_keyword(schema), max_size=4).map(dict),
    max_leaves=10,
)


@settings(max_examples=1500, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(schema=_generated)
def test_generated_schemas_get_jsonschemas_verdict(schema: Any) -> None:
    assert agent_accepts(schema) == reference_accepts(schema), schema


def test_older_drafts_and_deep_nesting_are_refused_with_a_reason() -> None:
    with pytest.raises(SchemaError, match=r"schema.\$schema: .*draft-04.* is not supported"):
        check_schema({"$schema": "http://json-schema.org/draft-04/schema#"})
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH):
        deep = {"items": deep}
    check_schema(deep)
    with pytest.raises(SchemaError, match=f"nested deeper than {MAX_DEPTH} levels"):
        check_schema({"items": deep})


# Through a real agent, in front of the echo stand-in.


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    base = tmp_path_factory.mktemp("structured")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    server = bin_dir / "llama-server"
    server.write_text(f"#!{sys.executable}\n" + ECHO.read_text())
    server.chmod(0o755)
    model = base / "model.gguf"
    model.write_bytes(b"GGUF")  # the stand-in never reads it
    config = {
        "agent": {"max_constraint_bytes": 1024},
        "llama": {"bin_dir": bin_dir},
        "decoder": {"model": model},
        "metrics": {"vcgencmd": ""},
        "store": {"free_space_margin_mib": 0},
    }
    with AgentProcess(base, config) as proc:
        proc.wait_for(lambda: proc.request("GET", "/readyz")[0] == 200, timeout=30)
        yield proc


PATHS = [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "Bonjour"})]


@pytest.mark.parametrize(("path", "base"), PATHS, ids=["chat", "completion"])
@pytest.mark.parametrize("form", FORMS, ids=[f.id for f in FORMS])
def test_llama_server_receives_the_constraint(
    agent: AgentProcess, path: str, base: dict, form: Form
) -> None:
    status, body = agent.json("POST", path, {**base, **form.given})
    assert status == 200, body
    assert body["path"] == path and body["received"] == {**base, **form.sent}


def error_of(agent: AgentProcess, path: str, body: Any, status: int) -> str:
    got, answer = agent.json("POST", path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and answer["error"]["code"] == status
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]["message"]


@pytest.mark.parametrize(("path", "base"), PATHS, ids=["chat", "completion"])
def test_bad_constraints_answer_400_or_413_in_openais_shape(
    agent: AgentProcess, path: str, base: dict
) -> None:
    def refused(given: dict, status: int = 400) -> str:
        return error_of(agent, path, {**base, **given}, status)

    schema = {"type": "object", "required": ["a", "a"]}
    assert refused({"response_format": {"type": "json_schema", "schema": schema}}) == (
        "response_format.schema.required: must not repeat a string"
    )
    assert "must be one of text, json_object, json_schema" in refused(
        {"response_format": {"type": "xml"}}
    )
    assert refused({"response_format": "json"}) == "body.response_format: must be object"
    assert refused({"grammar": 5}) == "body.grammar: must be string"
    assert "exclude each other" in refused(
        {"grammar": "root ::= x", "response_format": {"type": "json_object"}}
    )
    big = {"type": "object", "description": "x" * 2000}
    assert "over the limit of 1024 (agent.max_constraint_bytes)" in refused(
        {"response_format": {"type": "json_object", "schema": big}}, 413
    )
    assert "over the limit of 1024" in refused({"grammar": "root ::= " + "x" * 1100}, 413)


def test_nan_and_infinity_are_refused_before_reaching_llama_server(agent: AgentProcess) -> None:
    raw = b'{"prompt": "x", "response_format": {"type": "json_object", "schema": {"minimum": NaN}}}'
    status, _, answer = agent.request(
        "POST", "/v1/completions", raw, headers={"Content-Type": "application/json"}
    )
    assert (
        status == 400 and "NaN: JSON numbers are finite" in json.loads(answer)["error"]["message"]
    )
    raw = b'{"prompt": "x", "temperature": 1e999}'
    status, _, answer = agent.request(
        "POST", "/v1/completions", raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "1e999" in json.loads(answer)["error"]["message"]


def test_a_constraint_llama_server_cannot_convert_is_400_in_its_words(agent: AgentProcess) -> None:
    message = error_of(agent, "/v1/completions", {"prompt": "x", "grammar": 'root ::= "fail"'}, 400)
    assert message == (
        "llama-server refused the constraint: JSON schema conversion failed: "
        "stub: no grammar for this"
    )
    # Without a constraint, the same failure stays llama-server's: a 502, in its words.
    status, answer = agent.json("POST", "/v1/completions", {"prompt": FAIL_PROMPT})
    assert status == 502 and answer["error"]["type"] == "server_error"
    assert answer["error"]["message"].startswith("the decoder failed (500): JSON schema")
    # A constrained request whose output llama-server fails to parse: llama-server's fault.
    status, answer = agent.json("POST", "/v1/completions", {
        "prompt": "parser", "response_format": {"type": "json_object"}})  # fmt: skip
    assert status == 502 and "peg-native" in answer["error"]["message"]


def test_the_published_schema_describes_the_constraints(agent: AgentProcess) -> None:
    doc = agent.json("GET", "/openapi.json")[1]
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert set(schemas[name]["properties"]) >= {"response_format", "grammar"}
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == [
        "text", "json_object", "json_schema"
    ]  # fmt: skip
