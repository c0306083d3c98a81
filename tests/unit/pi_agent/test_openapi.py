"""The request validator enforces the published schemas."""

from __future__ import annotations

import pytest

from pi_agent.openapi import SCHEMAS, ValidationError, document, validate

CHAT = SCHEMAS["ChatCompletionRequest"]


def test_a_plain_chat_request_is_valid() -> None:
    validate(
        {
            "model": "x",
            "messages": [{"role": "user", "content": "salut"}],
            "max_tokens": 8,
            "stream": True,
            "stop": ["\n"],
        },
        CHAT,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "content"),
    ],
    ids=[
        "no messages",
        "empty messages",
        "unknown role",
        "zero tokens",
        "boolean tokens",
        "hot temperature",
        "unknown field",
        "lone surrogate",
    ],
)
def test_bad_chat_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate(body, CHAT)
    assert field in str(err.value)


def test_patterns_match_to_the_very_end() -> None:
    with pytest.raises(ValidationError):
        validate(
            {"version": "v1\n", "url": "http://x", "sha256": "a" * 64}, SCHEMAS["InstallRequest"]
        )


def test_document_references_only_known_schemas() -> None:
    import json

    text = json.dumps(document())
    for ref in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert ref in SCHEMAS


INSTALL = SCHEMAS["InstallRequest"]


@pytest.mark.parametrize(
    "source",
    [{"url": "https://x/m.gguf"}, {"path": "/var/lib/pi-agent/incoming/m.gguf"}],
    ids=["from a url", "from the incoming folder"],
)
def test_an_install_takes_a_url_or_a_path(source: dict) -> None:
    validate({"version": "v1", "sha256": "a" * 64, **source}, INSTALL)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of url, path"),
        ({"url": "https://x/m.gguf", "path": "/m.gguf"}, "exactly one of url, path"),
        ({"path": "m.gguf"}, "body.path: does not match"),
        ({"path": "/m.gguf", "extra": 1}, "unknown field 'extra'"),
    ],
    ids=["neither", "both", "a relative path", "an unknown field"],
)
def test_an_install_needs_exactly_one_source(body: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate({"version": "v1", "sha256": "a" * 64, **body}, INSTALL)


def test_blobs_are_published_with_ranges() -> None:
    blob = document()["paths"]["/v1/blobs/{sha256}"]
    assert set(blob) == {"parameters", "get", "head"}
    assert {"200", "206", "416"} <= set(blob["get"]["responses"])
    assert blob["get"]["parameters"][0]["name"] == "Range"
