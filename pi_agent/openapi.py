"""The API's OpenAPI 3.1 document, and the small JSON-schema validator that enforces it.

The request schemas here are the ones ``/openapi.json`` publishes, so what the document promises
is what the agent checks: a body that does not match is a 400 naming the field, never something
passed on to llama-server to fail there.
"""

from __future__ import annotations

import copy
from typing import Any

from pi_agent import __version__

INT32 = 2**31 - 1
_text = {"type": "string", "maxLength": 16000}
_stop = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 64},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 64},
            "maxItems": 4,
        },
    ]
}
_sampling: dict[str, Any] = {
    "model": {"type": "string", "maxLength": 128},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "minimum": 0, "maximum": INT32},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "stop": _stop,
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "user": {"type": "string", "maxLength": 256},
    "response_format": {"$ref": "#/components/schemas/ResponseFormat"},
    "grammar": {
        "type": "string",
        "minLength": 1,
        "description": "A GBNF grammar the answer must follow (not with response_format). At "
        "most agent.max_constraint_bytes bytes (64 KiB by default), else 413.",
    },
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "ChatMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": _text,
            "name": {"type": "string", "maxLength": 64},
        },
        "additionalProperties": False,
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": 64,
                "items": {"$ref": "#/components/schemas/ChatMessage"},
            },
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
            **_sampling,
        },
        "additionalProperties": False,
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {"prompt": _text, **_sampling},
        "additionalProperties": False,
    },
    "ResponseFormat": {
        "type": "object",
        "description": "text (no constraint), json_object (any object, or `schema` beside the "
        "type, llama.cpp's form) or json_schema (OpenAI's `json_schema` wrapper, or a bare "
        "`schema`). The schema must pass the JSON Schema meta-schema (draft 2020-12, or draft 7 "
        "by $schema), nest at most 64 levels and take at most agent.max_constraint_bytes bytes "
        "(64 KiB by default, else 413). Not with grammar.",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"$ref": "#/components/schemas/JsonSchemaFormat"},
            "schema": {"type": "object"},
        },
        "additionalProperties": False,
    },
    "JsonSchemaFormat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string", "maxLength": 4000},
            "schema": {"type": "object"},
            "strict": {
                "type": "boolean",
                "description": "Accepted; the answer is always held to the schema by a grammar.",
            },
        },
        "additionalProperties": False,
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1, "maxLength": 8000},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 32,
                        "items": {"type": "string", "minLength": 1, "maxLength": 8000},
                    },
                ]
            },
            "model": {"type": "string", "maxLength": 128},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "user": {"type": "string", "maxLength": 256},
        },
        "additionalProperties": False,
    },
    "InstallRequest": {
        "type": "object",
        "description": "Install from `url` (the agent downloads it) or from `path` (a file a "
        "downloader left directly in the incoming folder, store.incoming_dir, moved into the "
        "store by rename): exactly one of the two.",
        "required": ["version", "sha256"],
        "properties": {
            "version": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            "url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
            "path": {"type": "string", "pattern": "^/", "maxLength": 4096},
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            "name": {"type": "string", "maxLength": 128},
            "activate": {"type": "boolean"},
        },
        "oneOf": [{"required": ["url"]}, {"required": ["path"]}],
        "additionalProperties": False,
    },
    "BenchRequest": {
        "type": "object",
        "properties": {
            "threads": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": {"type": "integer", "minimum": 1, "maximum": 64},
            },
            "n_prompt": {"type": "integer", "minimum": 0, "maximum": 4096},
            "n_gen": {"type": "integer", "minimum": 0, "maximum": 1024},
            "repetitions": {"type": "integer", "minimum": 1, "maximum": 20},
            "tolerance": {"type": "number", "minimum": 0, "maximum": 0.99},
            "expected": {
                "type": "object",
                "description": "tokens/s the gate expects per test kind, in place of the "
                "regressor's prediction (pp: prompt processing, tg: generation)",
                "properties": {
                    "pp": {"type": "number", "minimum": 0.001, "maximum": 1e9},
                    "tg": {"type": "number", "minimum": 0.001, "maximum": 1e9},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": "integer"},
                },
            }
        },
    },
    "ModelVersion": {
        "type": "object",
        "required": ["id", "object", "version", "sha256", "size", "active"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "version": {"type": "string"},
            "name": {"type": "string"},
            "sha256": {"type": "string"},
            "size": {"type": "integer"},
            "active": {"type": "boolean"},
            "previous": {"type": "boolean"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/ModelVersion"}},
        },
    },
}

VERSION_PARAM = {
    "name": "version", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
}  # fmt: skip
SHA256_PARAM = {
    "name": "sha256", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}  # fmt: skip
RANGE_PARAM = {
    "name": "Range", "in": "header", "required": False,
    "description": "One range: bytes=a-b, bytes=a- or bytes=-n. Several ranges are answered with "
    "the whole file (200); a range that does not parse is ignored.",
    "schema": {"type": "string", "maxLength": 200},
}  # fmt: skip
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_BLOB_HEADERS = {
    name: {"schema": {"type": "string"}} for name in ("Accept-Ranges", "Content-Length", "ETag")
}


def _blob_answers(ranges: bool) -> dict[str, Any]:
    range_header = {"Content-Range": {"schema": {"type": "string"}}}
    out = _answers(200, 400, 404, *((416,) if ranges else ()), *_AUTH)
    out["200"] = {"description": "The whole file", "headers": _BLOB_HEADERS, "content": _BINARY}
    if ranges:
        out["206"] = {
            "description": "The requested range",
            "headers": {**_BLOB_HEADERS, **range_header},
            "content": _BINARY,
        }
        out["416"]["description"] = "Unsatisfiable range (Content-Range: bytes */size)"
        out["416"]["headers"] = range_header
    return out


def _json_body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _answers(
    *codes: int, ok: str | None = None, ok_type: str = "application/json"
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        if code < 300:
            schema = {"$ref": f"#/components/schemas/{ok}"} if ok else {"type": "object"}
            if ok_type == "application/json":
                out[str(code)] = {"description": "OK", "content": {ok_type: {"schema": schema}}}
            else:
                out[str(code)] = {
                    "description": "OK",
                    "content": {ok_type: {"schema": {"type": "string"}}},
                }
        else:
            out[str(code)] = {
                "description": "Error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
    return out


_AUTH = (401, 403)


def document() -> dict[str, Any]:
    """The OpenAPI document served at ``/openapi.json``."""
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {"summary": "The agent is alive", "security": [], "responses": _answers(200)}
        },
        "/readyz": {
            "get": {
                "summary": "The model is loaded and answering",
                "responses": _answers(200, 503, *_AUTH),
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": _answers(200, *_AUTH, ok_type="text/plain"),
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": _answers(200, *_AUTH)}},
        "/v1/status": {
            "get": {
                "summary": "Host, board, model, llama.cpp, temperature, zram",
                "responses": _answers(200, *_AUTH),
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI chat completion (stream=true answers server-sent events)",
                "description": "response_format or grammar hold the answer to a JSON Schema or "
                "a GBNF grammar (400 when invalid, 413 when too large).",
                "requestBody": _json_body("ChatCompletionRequest"),
                "responses": _answers(200, 400, 413, 415, 503, *_AUTH),
            }
        },
        "/v1/completions": {
            "post": {
                "summary": "OpenAI text completion",
                "description": "response_format or grammar as on /v1/chat/completions.",
                "requestBody": _json_body("CompletionRequest"),
                "responses": _answers(200, 400, 413, 415, 503, *_AUTH),
            }
        },
        "/v1/embeddings": {
            "post": {
                "summary": "OpenAI embeddings (the encoder)",
                "requestBody": _json_body("EmbeddingRequest"),
                "responses": _answers(200, 400, 404, 413, 415, 503, *_AUTH),
            }
        },
        "/v1/models": {
            "get": {
                "summary": "Installed model versions (OpenAI list shape)",
                "responses": _answers(200, *_AUTH, ok="ModelList"),
            },
            "post": {
                "summary": "Install a version from a URL or an incoming file, verified by sha256",
                "requestBody": _json_body("InstallRequest"),
                "responses": _answers(201, 400, 409, 413, 415, 422, 507, *_AUTH),
            },
        },
        "/v1/blobs/{sha256}": {
            "parameters": [SHA256_PARAM],
            "get": {
                "summary": "The GGUF of an installed version with this sha256 (byte ranges served)",
                "description": "Takes the agent's token or the fleet's peer token "
                "(agent.peer_token_file), which works on this path only.",
                "parameters": [RANGE_PARAM],
                "responses": _blob_answers(ranges=True),
            },
            "head": {
                "summary": "Size and ETag of the blob, without the body",
                "responses": _blob_answers(ranges=False),
            },
        },
        "/v1/models/rollback": {
            "post": {
                "summary": "Switch back to the previous version",
                "responses": _answers(200, 409, 503, *_AUTH),
            }
        },
        "/v1/models/{version}": {
            "parameters": [VERSION_PARAM],
            "get": {"summary": "One version's manifest", "responses": _answers(200, 404, *_AUTH)},
            "put": {
                "summary": "Upload a version (the raw GGUF), verified by sha256",
                "parameters": [
                    {
                        "name": "sha256",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                    },
                    {
                        "name": "name",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 128},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "responses": _answers(201, 400, 408, 409, 411, 413, 422, 507, *_AUTH),
            },
            "delete": {
                "summary": "Delete a version (not the active or previous one)",
                "responses": _answers(200, 404, 409, *_AUTH),
            },
        },
        "/v1/models/{version}/activate": {
            "parameters": [VERSION_PARAM],
            "post": {
                "summary": "Switch to a version; rolled back if the probe fails",
                "responses": _answers(200, 404, 409, 503, *_AUTH),
            },
        },
        "/v1/bench": {
            "get": {
                "summary": "The last benchmark's summary",
                "responses": _answers(200, 404, *_AUTH),
            },
            "post": {
                "summary": "Run llama-bench (configured or given parameters)",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/BenchRequest"}
                        }
                    },
                },
                "responses": _answers(200, 400, 409, 415, 422, *_AUTH),
            },
        },
        "/v1/bench/csv": {
            "get": {
                "summary": "The last benchmark's CSV",
                "responses": _answers(200, 404, *_AUTH, ok_type="text/csv"),
            }
        },
    }
    for path, method in (
        ("/v1/models", "post"),
        ("/v1/models/{version}", "put"),
        ("/v1/models/{version}/activate", "post"),
        ("/v1/models/rollback", "post"),
    ):
        paths[path][method]["responses"]["403"]["description"] = (
            "Invalid token, or a sha256 not in the allowlist (store.allowlist_file)"
        )
    for path, method in (("/v1/models", "post"), ("/v1/models/{version}", "put")):
        paths[path][method]["responses"]["422"]["description"] = (
            "sha256 or size mismatch, an unreachable URL, or a GGUF whose header says it is "
            "of the other kind (an encoder on /v1/models, a decoder on /v1/encoder/models)"
        )
    # The encoder's store: the same routes and rules under /v1/encoder/models.
    for path in [p for p in paths if p.startswith("/v1/models")]:
        routes = copy.deepcopy(paths[path])
        for method, operation in routes.items():
            if method != "parameters":
                summary = operation["summary"]
                operation["summary"] = f"Encoder (embeddings): {summary[0].lower()}{summary[1:]}"
        paths[path.replace("/v1/models", "/v1/encoder/models", 1)] = routes
    paths["/v1/encoder/models/{version}/activate"]["post"]["description"] = (
        "The encoder's llama-server (--embedding) restarts on the version and is probed with one "
        "embedding request: the vector must have the model's size (its GGUF's "
        "<arch>.embedding_length), else the previous version is back (409). /v1/embeddings is "
        "served once a version is active (unless encoder.enabled is false or encoder.model is set)."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pi-agent",
            "version": __version__,
            "description": "The per-Pi agent of pidistill.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The agent's own token (agent.token_file) opens every path. "
                    "The fleet's service token (agent.service_token_file) opens inference, "
                    "readiness, metrics, status and the model lists only; the peer token "
                    "(agent.peer_token_file) the blobs only.",
                }
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


class ValidationError(ValueError):
    """The request body does not match its schema; the message names the field."""


_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool,
}  # fmt: skip


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value: Any, schema: dict[str, Any], where: str = "body") -> None:
    """Check ``value`` against the subset of JSON schema the API uses."""
    import re

    if "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                validate(value, option, where)
            except ValidationError:
                continue
            return
        raise ValidationError(f"{where}: does not match any allowed form")
    kind = schema.get("type")
    if kind and not _type_ok(value, kind):
        raise ValidationError(f"{where}: must be {kind}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValidationError(f"{where}: must be one of {', '.join(map(str, schema['enum']))}")
    if kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValidationError(f"{where}: must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValidationError(f"{where}: must be at most {schema['maximum']}")
        if kind == "number" and value != value:  # NaN
            raise ValidationError(f"{where}: must be a number")
    elif kind == "string":
        if len(value) < schema.get("minLength", 0):
            raise ValidationError(f"{where}: too short")
        if len(value) > schema.get("maxLength", 1 << 30):
            raise ValidationError(f"{where}: longer than {schema['maxLength']} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{where}: not valid Unicode text") from None
        # ECMA's $ is the very end; Python's also matches before a final newline.
        pattern = schema.get("pattern", "")
        if pattern and not re.search(
            pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern, value
        ):
            raise ValidationError(f"{where}: does not match {schema['pattern']}")
    elif kind == "array":
        if len(value) < schema.get("minItems", 0):
            raise ValidationError(f"{where}: needs at least {schema['minItems']} item(s)")
        if len(value) > schema.get("maxItems", 1 << 30):
            raise ValidationError(f"{where}: at most {schema['maxItems']} items")
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "object" or (kind is None and isinstance(value, dict)):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise ValidationError(f"{where}.{name}: required")
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], f"{where}.{name}")
            elif schema.get("additionalProperties", True) is False:
                raise ValidationError(f"{where}: unknown field {name!r}")
    if "oneOf" in schema:
        options = schema["oneOf"]
        matched = 0
        for option in options:
            try:
                validate(value, option, where)
            except ValidationError:
                continue
            matched += 1
        if matched != 1:
            fields = [name for option in options for name in option.get("required", [])]
            raise ValidationError(
                f"{where}: needs exactly one of {', '.join(fields)}"
                if fields
                else f"{where}: must match exactly one allowed form"
            )
