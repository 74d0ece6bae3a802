"""Structured output: a JSON schema as a GBNF grammar the last stage's sampler enforces.

llama-cpp-python's ``json_schema_to_gbnf`` writes the grammar. It silently drops what it
cannot express (``minimum``, ``uniqueItems``, ``not``, ...), which would let an answer
through that does not validate, so ``schema_grammar`` walks the schema first and refuses
every keyword the grammar would not enforce, naming it and where it is. Annotations
(``title``, ``description``, ``default``, ...) change nothing and pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from orchcore.errors import InvalidInputError


class SchemaError(InvalidInputError):
    """A JSON schema orch cannot enforce; ``where`` is the JSON pointer of the keyword."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where or '/'}: {message}")
        self.where = where


# Keywords the grammar enforces, by what they apply to; anything else (but annotations) is
# refused. ``format`` is an annotation in JSON Schema unless a validator asserts it; the
# grammar enforces date, time, date-time and uuid.
_ENFORCED = {"type", "properties", "required", "additionalProperties", "items",
             "prefixItems", "minItems", "maxItems", "enum", "const", "anyOf", "$ref",
             "$defs", "definitions", "pattern", "minLength", "maxLength", "format", "strict"}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "deprecated", "readOnly", "writeOnly", "discriminator"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def schema_grammar(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) of JSON texts that validate against ``schema``,
    or a ``SchemaError`` naming the first keyword it cannot enforce."""
    if not isinstance(schema, Mapping):
        raise SchemaError("", "a JSON schema is an object")
    _check(schema, "")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SchemaError("", f"cannot be turned into a grammar ({exc}); simplify it"
                          ) from None


def any_object_grammar() -> str:
    """Any JSON object (OpenAI's ``json_object`` mode)."""
    return schema_grammar({"type": "object"})


def _check(schema: Any, where: str) -> None:
    if isinstance(schema, bool):
        if not schema:
            raise SchemaError(where, "false (nothing is valid) is not supported")
        return
    if not isinstance(schema, Mapping):
        raise SchemaError(where, "a schema must be an object")
    for key in schema:
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            hint = (" (use anyOf)" if key == "oneOf" else
                    " (write the object out whole)" if key == "allOf" else "")
            raise SchemaError(f"{where}/{key}", f"{key!r} is not supported in structured "
                                                f"output{hint}; remove it")
    kind = schema.get("type")
    if isinstance(kind, list):
        extra = set(schema) - _ANNOTATIONS - {"type"}
        if extra:
            raise SchemaError(f"{where}/type", f"a list of types with {sorted(extra)} is not "
                                               f"supported; use anyOf of whole schemas")
        kind = None
        if not set(schema["type"]) <= _TYPES:
            raise SchemaError(f"{where}/type", f"unknown type in {schema['type']!r}")
    elif kind is not None and kind not in _TYPES:
        raise SchemaError(f"{where}/type", f"unknown type {kind!r}")
    if "pattern" in schema and ({"minLength", "maxLength", "format"} & set(schema)):
        raise SchemaError(f"{where}/pattern", "pattern together with minLength, maxLength "
                                              "or format is not supported; use one of them")
    if ({"minLength", "maxLength"} & set(schema)) and kind != "string":
        raise SchemaError(where, "minLength and maxLength need \"type\": \"string\"")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise SchemaError(f"{where}/$ref", f"only references inside the schema (#/...) are "
                                           f"supported, not {ref!r}")
    properties = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in properties]
    if missing:
        raise SchemaError(f"{where}/required", f"{missing} are required but not in "
                                               f"properties; describe them there")
    for name, sub in properties.items():
        _check(sub, f"{where}/properties/{name}")
    for key in ("$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            _check(sub, f"{where}/{key}/{name}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        _check(sub, f"{where}/anyOf/{i}")
    items = schema.get("items")
    if isinstance(items, list):
        raise SchemaError(f"{where}/items", "a list of items is not supported; use prefixItems")
    if items is not None:
        _check(items, f"{where}/items")
    if "prefixItems" in schema and ({"items", "minItems", "maxItems"} & set(schema)):
        raise SchemaError(f"{where}/prefixItems", "prefixItems with items, minItems or "
                                                  "maxItems is not supported")
    for i, sub in enumerate(schema.get("prefixItems", [])):
        _check(sub, f"{where}/prefixItems/{i}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        _check(extra, f"{where}/additionalProperties")
