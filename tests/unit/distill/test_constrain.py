"""The bounds given to a schema while generating, and the grammar that holds a tiny model to it."""

from __future__ import annotations

from distill.constrain import MAX_ITEMS, MAX_STRING, bounded


def test_unbounded_strings_and_arrays_get_a_bound_and_bounded_ones_keep_theirs() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "short": {"type": "string", "maxLength": 5},
            "choice": {"type": "string", "enum": ["a", "b"]},
            "list": {"type": "array", "items": {"type": ["string", "null"]}},
            "long": {"type": "array", "minItems": 20},
        },
    }
    out = bounded(schema)
    props = out["properties"]
    assert props["free"]["maxLength"] == MAX_STRING
    assert props["short"]["maxLength"] == 5
    assert "maxLength" not in props["choice"]
    assert props["list"]["maxItems"] == MAX_ITEMS
    assert props["list"]["items"]["maxLength"] == MAX_STRING
    assert props["long"]["maxItems"] == 20  # never below what the schema asks for
    assert "maxLength" not in schema["properties"]["free"]  # the row's own schema is untouched
