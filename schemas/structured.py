"""Which JSON Schemas a request may ask the model's output to follow (`extract`, and chat's
`response_format`), and the caps that keep a hostile one bounded. Pure: a walk over the schema.

What passes here is what constrained decoding enforces exactly (measured keyword by keyword,
tests/bench/bench_grammar_libs.py): a keyword the grammar engine would ignore or cannot
compile is refused here, by name and JSON pointer, so an `ok` reply always validates against
its schema. The engine may still refuse a schema this walk accepts (an unsatisfiable one, say);
that is a `validation` error too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SchemaLimits(BaseModel):
    """Caps on a request's JSON Schema (part of `OPERATION_LIMITS` for extract and chat)."""

    model_config = ConfigDict(frozen=True)

    max_schema_chars: int = Field(
        default=16_000, description="The schema's size as compact JSON, in characters."
    )
    max_depth: int = Field(
        default=10, description="Nesting of subschemas (properties, items, anyOf, ...)."
    )
    max_subschemas: int = Field(default=300, description="Subschemas in all, $defs included.")
    max_properties: int = Field(default=100, description="Named properties of one object.")
    max_enum_values: int = Field(default=256, description="Values of one enum.")
    max_pattern_chars: int = Field(default=300, description="Length of one regex pattern.")


TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
)
"""String formats enforced while decoding (others are refused, not silently ignored)."""

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "$schema",
        "$id",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
"""Keywords that describe and constrain nothing: accepted and ignored."""

UNSUPPORTED = frozenset(
    {
        "uniqueItems",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "contains",
        "minContains",
        "maxContains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)
"""JSON Schema keywords constrained decoding cannot enforce: refused by name."""

# keyword -> what its value must be
_SCHEMA = "schema"
_SCHEMA_MAP = "schema map"
_SCHEMA_LIST = "schema list"
_COUNT = "count"
_NUMBER = "number"
_KEYWORDS: dict[str, str] = {
    "type": "type",
    "enum": "enum",
    "const": "any",
    "properties": _SCHEMA_MAP,
    "patternProperties": _SCHEMA_MAP,
    "additionalProperties": _SCHEMA,
    "required": "names",
    "minProperties": _COUNT,
    "maxProperties": _COUNT,
    "items": _SCHEMA,
    "prefixItems": _SCHEMA_LIST,
    "minItems": _COUNT,
    "maxItems": _COUNT,
    "minLength": _COUNT,
    "maxLength": _COUNT,
    "pattern": "pattern",
    "format": "format",
    "minimum": _NUMBER,
    "maximum": _NUMBER,
    "exclusiveMinimum": _NUMBER,
    "exclusiveMaximum": _NUMBER,
    "multipleOf": "positive",
    "anyOf": _SCHEMA_LIST,
    "oneOf": _SCHEMA_LIST,
    "allOf": _SCHEMA_LIST,
    "$ref": "ref",
    "$defs": _SCHEMA_MAP,
    "definitions": _SCHEMA_MAP,
}


class SchemaProblem(ValueError):
    """Why a JSON Schema is refused: `pointer` (RFC 6901, into the schema) and `keyword`."""

    def __init__(self, pointer: str, keyword: str | None, reason: str) -> None:
        where = pointer or "/"
        super().__init__(f"schema at {where}: {reason}")
        self.pointer = pointer
        self.keyword = keyword
        self.reason = reason


@dataclass
class _Walk:
    root: dict[str, Any]
    limits: SchemaLimits
    subschemas: int = 0


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def check_json_schema(
    schema: Any, limits: SchemaLimits, *, root_type: str | None = "object"
) -> None:
    """Raise SchemaProblem unless `schema` is a JSON Schema constrained decoding enforces
    exactly, within `limits`; `root_type`: the type the root must declare."""
    if not isinstance(schema, dict):
        raise SchemaProblem("", None, "must be a JSON object")
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    if size > limits.max_schema_chars:
        raise SchemaProblem(
            "", None, f"is {size} characters as JSON; at most {limits.max_schema_chars} allowed"
        )
    if root_type is not None and schema.get("type") != root_type:
        raise SchemaProblem("/type", "type", f'the root must declare "type": "{root_type}"')
    walk = _Walk(schema, limits)
    _check(walk, schema, "", 0)
    _check_refs(schema)


def _check(walk: _Walk, schema: Any, pointer: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaProblem(pointer, None, "a subschema must be an object or a boolean")
    walk.subschemas += 1
    if walk.subschemas > walk.limits.max_subschemas:
        raise SchemaProblem(
            pointer, None, f"more than {walk.limits.max_subschemas} subschemas in all"
        )
    if depth > walk.limits.max_depth:
        raise SchemaProblem(pointer, None, f"nested deeper than {walk.limits.max_depth} subschemas")
    for keyword, value in schema.items():
        at = f"{pointer}/{_escape(keyword)}"
        if keyword in ANNOTATIONS:
            continue
        if keyword in UNSUPPORTED:
            raise SchemaProblem(at, keyword, f"keyword {keyword!r} is not supported")
        kind = _KEYWORDS.get(keyword)
        if kind is None:
            raise SchemaProblem(at, keyword, f"unknown keyword {keyword!r}")
        for child, child_at in _check_value(walk, keyword, kind, value, at):
            _check(walk, child, child_at, depth + 1)
    _check_bounds(schema, pointer)


def _check_value(
    walk: _Walk, keyword: str, kind: str, value: Any, at: str
) -> Iterator[tuple[Any, str]]:
    """Check one keyword's value; yield the subschemas it holds, with their pointers."""
    limits = walk.limits
    if kind == _SCHEMA:
        yield value, at
    elif kind == _SCHEMA_MAP:
        if not isinstance(value, dict):
            raise SchemaProblem(at, keyword, f"{keyword!r} must be an object")
        if keyword == "properties" and len(value) > limits.max_properties:
            raise SchemaProblem(
                at, keyword, f"more than {limits.max_properties} properties in one object"
            )
        for name, child in value.items():
            if keyword == "patternProperties":
                _check_pattern(name, f"{at}/{_escape(name)}", keyword, limits)
            yield child, f"{at}/{_escape(name)}"
    elif kind == _SCHEMA_LIST:
        if not isinstance(value, list) or not value:
            raise SchemaProblem(at, keyword, f"{keyword!r} must be a non-empty array")
        for index, child in enumerate(value):
            yield child, f"{at}/{index}"
    elif kind == "type":
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and n in TYPES for n in names):
            raise SchemaProblem(at, keyword, f"'type' must name one or more of {sorted(TYPES)}")
    elif kind == "enum":
        if not isinstance(value, list) or not value:
            raise SchemaProblem(at, keyword, "'enum' must be a non-empty array")
        if len(value) > limits.max_enum_values:
            raise SchemaProblem(
                at, keyword, f"more than {limits.max_enum_values} values in one enum"
            )
    elif kind == "names":
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise SchemaProblem(at, keyword, f"{keyword!r} must be an array of strings")
    elif kind == _COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemaProblem(at, keyword, f"{keyword!r} must be a non-negative integer")
    elif kind in (_NUMBER, "positive"):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise SchemaProblem(at, keyword, f"{keyword!r} must be a number")
        if kind == "positive" and value <= 0:
            raise SchemaProblem(at, keyword, f"{keyword!r} must be greater than 0")
    elif kind == "pattern":
        _check_pattern(value, at, keyword, limits)
    elif kind == "format":
        if value not in FORMATS:
            raise SchemaProblem(
                at, keyword, f"format {value!r} is not supported (supported: {sorted(FORMATS)})"
            )
    elif kind == "ref":
        if not isinstance(value, str) or not (value == "#" or value.startswith("#/")):
            raise SchemaProblem(
                at,
                keyword,
                "'$ref' must point into this schema ('#' or '#/...'); no remote references",
            )


def _check_pattern(pattern: Any, at: str, keyword: str, limits: SchemaLimits) -> None:
    if not isinstance(pattern, str):
        raise SchemaProblem(at, keyword, "a pattern must be a string")
    if len(pattern) > limits.max_pattern_chars:
        raise SchemaProblem(
            at, keyword, f"pattern longer than {limits.max_pattern_chars} characters"
        )


def _check_bounds(schema: dict[str, Any], pointer: str) -> None:
    """Lower bounds above upper bounds: an empty language, refused before it costs a compile."""
    for low, high in (
        ("minimum", "maximum"),
        ("minLength", "maxLength"),
        ("minItems", "maxItems"),
        ("minProperties", "maxProperties"),
    ):
        if low in schema and high in schema and schema[low] > schema[high]:
            raise SchemaProblem(f"{pointer}/{low}", low, f"{low!r} is greater than {high!r}")


def resolve_pointer(root: dict[str, Any], ref: str) -> Any:
    """The value a local `$ref` ('#' or '#/a/b') names in `root`; KeyError if none."""
    node: Any = root
    for token in ref[2:].split("/") if ref != "#" else []:
        name = _unescape(token)
        if isinstance(node, dict) and name in node:
            node = node[name]
        elif isinstance(node, list) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
        else:
            raise KeyError(ref)
    return node


def _refs(schema: Any, pointer: str) -> Iterator[tuple[str, str]]:
    """Every `$ref` under `schema` (not through other refs): (its pointer, its target)."""
    if isinstance(schema, dict):
        for keyword, value in schema.items():
            at = f"{pointer}/{_escape(keyword)}"
            if keyword == "$ref" and isinstance(value, str):
                yield at, value
            elif keyword in ("enum", "const") or keyword in ANNOTATIONS:
                continue
            else:
                yield from _refs(value, at)
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from _refs(item, f"{pointer}/{index}")


def _check_refs(root: dict[str, Any]) -> None:
    """Every `$ref` resolves, and none leads back to itself (a recursive schema has outputs
    of any depth: it is refused rather than bounded only by max_tokens)."""
    targets: dict[str, list[tuple[str, str]]] = {}
    for at, ref in _refs(root, ""):
        try:
            target = resolve_pointer(root, ref)
        except KeyError:
            raise SchemaProblem(at, "$ref", f"'$ref' {ref!r} points to nothing") from None
        if not isinstance(target, dict | bool):
            raise SchemaProblem(at, "$ref", f"'$ref' {ref!r} does not point to a schema")
        targets.setdefault(ref, list(_refs(target, ref[1:])))
    # Depth-first over the refs each target holds; a ref reached again on its own path loops.
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(ref: str, at: str) -> None:
        if state.get(ref) == 2:
            return
        if state.get(ref) == 1:
            raise SchemaProblem(at, "$ref", f"recursive '$ref' {ref!r} is not supported")
        state[ref] = 1
        for inner_at, inner in targets.get(ref, []):
            visit(inner, inner_at)
        state[ref] = 2

    for at, ref in _refs(root, ""):
        # A ref to '#' or to a schema holding the ref itself loops at once.
        if ref == "#" or at.startswith(f"{ref[1:]}/"):
            raise SchemaProblem(at, "$ref", f"recursive '$ref' {ref!r} is not supported")
        visit(ref, at)
