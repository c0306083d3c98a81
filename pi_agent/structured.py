"""Structured output: a completion's ``response_format`` or ``grammar``, checked, then handed to
llama-server in the fields it reads.

Accepted on /v1/chat/completions and /v1/completions alike::

    {"response_format": {"type": "text"}}                      # no constraint
    {"response_format": {"type": "json_object"}}               # any JSON object
    {"response_format": {"type": "json_object", "schema": S}}  # llama.cpp's form
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": S,
                                                               "strict": true}}}  # OpenAI's
    {"response_format": {"type": "json_schema", "schema": S}}  # the bare form some clients send
    {"grammar": "root ::= \\"oui\\" | \\"non\\""}                    # GBNF

llama-server (pinned build 0c1e570) reads a JSON Schema from ``json_schema`` and a GBNF grammar
from ``grammar`` on both endpoints, but ``response_format`` on chat only, and there only
``json_schema.schema``: the bare form would lose its schema and /v1/completions would ignore the
field. So the agent turns every accepted form into ``json_schema`` or ``grammar`` itself.

Checked before anything reaches llama-server (a 400, or a 413 beyond the size limit): the shape
(``pi_agent.openapi``), one constraint at a time, the size of the schema or grammar, and the
schema against the JSON Schema meta-schema (draft 2020-12, or draft 7 when ``$schema`` names it).
The meta-schema is written out here in the standard library because the agent installs without
dependencies on the Pi; the unit tests hold it to ``jsonschema``'s ``check_schema``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
DRAFT_7 = "http://json-schema.org/draft-07/schema"
# llama-server converts a schema to a grammar recursively: a bound keeps a hostile one from
# reaching its stack (real schemas nest a few levels).
MAX_DEPTH = 64
_SIMPLE_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_ANCHOR = re.compile(r"[A-Za-z_][-A-Za-z0-9._]*")


class ConstraintError(ValueError):
    """A response_format or grammar the agent refuses; ``status`` is 400, or 413 when too large."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SchemaError(ConstraintError):
    """A JSON Schema that the meta-schema refuses; the message names the keyword's path."""


# The meta-schema, one checker per keyword. A checker takes (value, where, draft, depth).
Check = Callable[[Any, str, str, int], None]


def _fail(where: str, what: str) -> None:
    raise SchemaError(f"{where}: {what}")


def _schema(value: Any, where: str, draft: str, depth: int) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, dict):
        _fail(where, "a schema must be an object or a boolean")
    if depth > MAX_DEPTH:
        _fail(where, f"nested deeper than {MAX_DEPTH} levels")
    keywords = _KEYWORDS[draft]
    for key, item in value.items():
        check = keywords.get(key)
        if check is not None:  # other keys are annotations: the meta-schema lets them be
            check(item, f"{where}.{key}", draft, depth)


def _schema_map(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, dict):
        _fail(where, "must be an object of schemas")
    for key, item in value.items():
        _schema(item, f"{where}.{key}", draft, depth + 1)


def _schema_list(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, list) or not value:
        _fail(where, "must be a non-empty array of schemas")
    for i, item in enumerate(value):
        _schema(item, f"{where}[{i}]", draft, depth + 1)


def _subschema(value: Any, where: str, draft: str, depth: int) -> None:
    _schema(value, where, draft, depth + 1)


def _string(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, str):
        _fail(where, "must be a string")


def _boolean(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, bool):
        _fail(where, "must be a boolean")


def _array(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, list):
        _fail(where, "must be an array")


def _number(value: Any, where: str, draft: str, depth: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(where, "must be a number")


def _positive(value: Any, where: str, draft: str, depth: int) -> None:
    _number(value, where, draft, depth)
    if value <= 0:
        _fail(where, "must be greater than 0")


def _count(value: Any, where: str, draft: str, depth: int) -> None:
    # JSON Schema's integer is a number with no fraction: 2.0 counts.
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        _fail(where, "must be an integer")
    if value < 0:
        _fail(where, "must not be negative")


def _regex(value: Any, where: str, draft: str, depth: int) -> None:
    _string(value, where, draft, depth)
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        _fail(where, f"not a regular expression ({exc})")


def _string_array(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        _fail(where, "must be an array of strings")
    if len(set(value)) != len(value):
        _fail(where, "must not repeat a string")


def _type(value: Any, where: str, draft: str, depth: int) -> None:
    names = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        _fail(where, "must name at least one type")
    if not all(isinstance(name, str) and name in _SIMPLE_TYPES for name in names):
        _fail(where, f"must be one of {', '.join(_SIMPLE_TYPES)} (or an array of them)")
    if len(set(names)) != len(names):
        _fail(where, "must not repeat a type")


def _pattern_properties(value: Any, where: str, draft: str, depth: int) -> None:
    _schema_map(value, where, draft, depth)
    for key in value:
        _regex(key, f"{where} key {key!r}", draft, depth)


def _string_array_map(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, dict):
        _fail(where, "must be an object of string arrays")
    for key, item in value.items():
        _string_array(item, f"{where}.{key}", draft, depth)


def _dependencies(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, dict):
        _fail(where, "must be an object")
    for key, item in value.items():
        if isinstance(item, list):
            _string_array(item, f"{where}.{key}", draft, depth)
        else:
            _schema(item, f"{where}.{key}", draft, depth + 1)


def _items_draft7(value: Any, where: str, draft: str, depth: int) -> None:
    if isinstance(value, list):
        _schema_list(value, where, draft, depth)
    else:
        _schema(value, where, draft, depth + 1)


def _anchor(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, str) or not _ANCHOR.fullmatch(value):
        _fail(where, "must be a name: a letter or _, then letters, digits, -, . or _")


def _id_2020(value: Any, where: str, draft: str, depth: int) -> None:
    _string(value, where, draft, depth)
    if "#" in value[:-1]:
        _fail(where, "must not hold a non-empty fragment")


def _vocabulary(value: Any, where: str, draft: str, depth: int) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, bool) for v in value.values()):
        _fail(where, "must be an object of booleans")


def _anything(value: Any, where: str, draft: str, depth: int) -> None:
    return


_COMMON: dict[str, Check] = {
    "$schema": _string, "$ref": _string, "$comment": _string,
    "title": _string, "description": _string, "default": _anything, "readOnly": _boolean,
    "examples": _array, "multipleOf": _positive, "maximum": _number,
    "exclusiveMaximum": _number, "minimum": _number, "exclusiveMinimum": _number,
    "maxLength": _count, "minLength": _count, "pattern": _regex, "maxItems": _count,
    "minItems": _count, "uniqueItems": _boolean, "contains": _subschema,
    "maxProperties": _count, "minProperties": _count, "required": _string_array,
    "additionalProperties": _subschema, "definitions": _schema_map, "properties": _schema_map,
    "patternProperties": _pattern_properties, "dependencies": _dependencies,
    "propertyNames": _subschema, "const": _anything, "enum": _array, "type": _type,
    "format": _string, "contentMediaType": _string, "contentEncoding": _string,
    "if": _subschema, "then": _subschema, "else": _subschema, "allOf": _schema_list,
    "anyOf": _schema_list, "oneOf": _schema_list, "not": _subschema,
}  # fmt: skip
_KEYWORDS: dict[str, dict[str, Check]] = {
    DRAFT_7: {
        **_COMMON, "$id": _string, "items": _items_draft7, "additionalItems": _subschema,
    },
    DRAFT_2020_12: {
        **_COMMON, "$id": _id_2020, "$anchor": _anchor, "$dynamicRef": _string,
        "$dynamicAnchor": _anchor, "$vocabulary": _vocabulary, "$defs": _schema_map,
        "$recursiveAnchor": _anchor, "$recursiveRef": _string, "prefixItems": _schema_list,
        "items": _subschema, "dependentSchemas": _schema_map, "unevaluatedItems": _subschema,
        "unevaluatedProperties": _subschema, "maxContains": _count, "minContains": _count,
        "dependentRequired": _string_array_map, "deprecated": _boolean, "writeOnly": _boolean,
        "contentSchema": _subschema,
    },
}  # fmt: skip


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raise ``SchemaError`` naming the keyword when ``schema`` breaks the JSON Schema
    meta-schema: draft 7 when ``$schema`` names it, else draft 2020-12 (as jsonschema's
    ``validator_for`` does for an absent or unknown ``$schema``). Older drafts are refused."""
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    draft = DRAFT_2020_12
    if isinstance(declared, str):
        uri = declared.removesuffix("#")
        if uri == DRAFT_7:  # jsonschema knows draft 7 by this http URI only
            draft = DRAFT_7
        elif re.search(r"json-schema\.org/(draft-0[3-6]|draft/2019-09)/", uri):
            raise SchemaError(
                f"{where}.$schema: {declared} is not supported; use draft 2020-12 or draft 7"
            )
    _schema(schema, where, draft, 0)


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _json_schema_of(response_format: dict[str, Any]) -> tuple[Any, str] | None:
    """The schema a response_format asks for, and where it was given; None for ``text``."""
    kind = response_format["type"]
    wrapper = response_format.get("json_schema")
    bare = "schema" in response_format
    where = "response_format"
    if kind == "text":
        if bare or wrapper is not None:
            raise ConstraintError(f"{where}: type text takes no schema")
        return None
    if kind == "json_object":
        if wrapper is not None:
            raise ConstraintError(f"{where}.json_schema: only with type json_schema")
        return response_format.get("schema", {}), f"{where}.schema"
    if bare == (wrapper is not None):
        raise ConstraintError(
            f"{where}: type json_schema needs json_schema (OpenAI's form) or schema, one of them"
        )
    if bare:
        return response_format["schema"], f"{where}.schema"
    # An absent schema means any object, as OpenAI and llama-server read it.
    return wrapper.get("schema", {}), f"{where}.json_schema.schema"


def for_llama_server(body: dict[str, Any], limit: int) -> tuple[dict[str, Any], bool]:
    """``body`` as llama-server should receive it, and whether it carries a constraint.

    ``body`` has passed its OpenAPI schema. Raises ``ConstraintError`` for two constraints at
    once, a schema or grammar over ``limit`` bytes (413), or a schema the meta-schema refuses.
    """
    if "response_format" not in body and "grammar" not in body:
        return body, False
    if "response_format" in body and "grammar" in body:
        raise ConstraintError("grammar and response_format exclude each other: give one of them")
    out = dict(body)
    if "grammar" in out:
        size = _size(out["grammar"])
        if size > limit:
            raise ConstraintError(
                f"grammar: {size} bytes, over the limit of {limit} (agent.max_constraint_bytes)",
                413,
            )
        return out, True
    found = _json_schema_of(out.pop("response_format"))
    if found is None:
        return out, False
    schema, where = found
    size = _size(schema)
    if size > limit:
        raise ConstraintError(
            f"{where}: {size} bytes, over the limit of {limit} (agent.max_constraint_bytes)", 413
        )
    check_schema(schema, where)
    out["json_schema"] = schema
    return out, True
