"""Which JSON Schemas a request may carry (schemas.structured): what constrained decoding
enforces is accepted, anything else and every hostile shape is refused by pointer and keyword."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas import operation_request_adapter
from schemas.structured import SchemaLimits, SchemaProblem, check_json_schema
from tests.support.extract_corpus import SCHEMAS

LIMITS = SchemaLimits()


def refused(schema: Any) -> SchemaProblem:
    with pytest.raises(SchemaProblem) as caught:
        check_json_schema(schema, LIMITS)
    return caught.value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_corpus_schemas_are_accepted(name: str) -> None:
    check_json_schema(SCHEMAS[name], LIMITS)


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


@pytest.mark.parametrize(
    ("schema", "pointer", "keyword"),
    [
        (obj(a={"type": "array", "uniqueItems": True}), "/properties/a/uniqueItems", "uniqueItems"),
        (obj(a={"not": {"type": "string"}}), "/properties/a/not", "not"),
        (obj(a={"type": "integer", "if": {"minimum": 1}}), "/properties/a/if", "if"),
        (obj(a={"type": "string", "format": "uri-reference"}), "/properties/a/format", "format"),
        (obj(a={"type": "strng"}), "/properties/a/type", "type"),
        (obj(a={"minimum": "1"}), "/properties/a/minimum", "minimum"),
        (obj(a={"x-custom": 1}), "/properties/a/x-custom", "x-custom"),
        (obj(a={"$ref": "https://example.com/s.json"}), "/properties/a/$ref", "$ref"),
        (obj(a={"$ref": "#/$defs/missing"}), "/properties/a/$ref", "$ref"),
        (obj(a={"type": "string", "minLength": 5, "maxLength": 2}), "/properties/a/minLength",
         "minLength"),
        (obj(a={"anyOf": []}), "/properties/a/anyOf", "anyOf"),
        (obj(**{"a/b": {"uniqueItems": True}}), "/properties/a~1b/uniqueItems", "uniqueItems"),
    ],
)  # fmt: skip
def test_a_schema_outside_what_is_enforced_is_refused_by_pointer_and_keyword(
    schema: dict[str, Any], pointer: str, keyword: str
) -> None:
    problem = refused(schema)
    assert (problem.pointer, problem.keyword) == (pointer, keyword)
    assert pointer in str(problem)


def test_the_root_must_be_an_object_schema() -> None:
    assert refused({"type": "array", "items": {}}).pointer == "/type"
    assert refused(["not", "a", "schema"]).pointer == ""


def test_deep_nesting_is_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(LIMITS.max_depth + 1):
        schema = obj(x=schema)
    assert "nested deeper" in refused(schema).reason


def test_a_huge_enum_is_refused() -> None:
    problem = refused(obj(a={"enum": list(range(LIMITS.max_enum_values + 1))}))
    assert problem.keyword == "enum"


def test_too_many_properties_or_subschemas_or_characters_are_refused() -> None:
    many = {f"p{i}": {"type": "integer"} for i in range(LIMITS.max_properties + 1)}
    assert refused(obj(**many)).keyword == "properties"
    wide = {f"p{i}": obj(**{f"q{j}": {"type": "integer"} for j in range(50)}) for i in range(8)}
    assert "subschemas" in refused(obj(**wide)).reason
    assert "characters" in refused(obj(a={"description": "x" * LIMITS.max_schema_chars})).reason


def test_a_long_pattern_is_refused() -> None:
    pattern = "^" + "(a|b)" * LIMITS.max_pattern_chars + "$"
    assert refused(obj(a={"type": "string", "pattern": pattern})).keyword == "pattern"


@pytest.mark.parametrize(
    "schema",
    [
        obj(child={"$ref": "#"}),
        {"type": "object", "$defs": {"n": obj(c={"$ref": "#/$defs/n"})},
         "properties": {"root": {"$ref": "#/$defs/n"}}},
        {"type": "object", "$defs": {"a": obj(b={"$ref": "#/$defs/b"}),
                                     "b": obj(a={"$ref": "#/$defs/a"})},
         "properties": {"root": {"$ref": "#/$defs/a"}}},
    ],
)  # fmt: skip
def test_recursive_refs_are_refused(schema: dict[str, Any]) -> None:
    problem = refused(schema)
    assert problem.keyword == "$ref" and "recursive" in problem.reason


def test_a_shared_non_recursive_ref_is_accepted() -> None:
    check_json_schema(SCHEMAS["address_book"], LIMITS)


def test_an_extract_request_with_a_refused_schema_is_a_validation_error_naming_the_pointer() -> (
    None
):
    body = {"operation": "extract", "tenant_id": "t1", "text": "x",
            "schema": obj(a={"type": "array", "uniqueItems": True})}  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        operation_request_adapter.validate_python(body)
    error = caught.value.errors()[0]
    assert error["loc"][-1] == "schema" and error["type"] == "json_schema"
    assert "/properties/a/uniqueItems" in error["msg"] and "uniqueItems" in error["msg"]


def test_extract_and_chat_response_format_round_trip_under_their_wire_names() -> None:
    person = SCHEMAS["person"]
    body = {"operation": "extract", "tenant_id": "t1", "text": "Bob, 30", "schema": person}
    extract = operation_request_adapter.validate_python({**body, "instructions": "the person"})
    assert extract.model_dump(exclude_none=True)["schema"] == person
    openai = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": person}}
    messages = [{"role": "user", "content": "hi"}]
    chat = operation_request_adapter.validate_python(
        {"operation": "chat", "tenant_id": "t1", "messages": messages, "response_format": openai}
    )
    dumped = chat.model_dump(exclude_none=True)["response_format"]
    assert dumped == {"type": "json_schema", "schema": person, "name": "p", "strict": True}
    again = operation_request_adapter.validate_python(chat.model_dump(exclude_none=True))
    assert again == chat
