"""What a request asks its output to follow: a JSON Schema, or any JSON object. Pure data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class JsonConstraint:
    """The output must be one JSON object valid against `schema_json` (compact JSON text, the
    properties in the order given: the order the output writes them in)."""

    schema_json: str
    key: str = field(init=False)  # what compiled grammars are cached by

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.schema_json.encode("utf-8")).hexdigest()
        object.__setattr__(self, "key", digest)

    @classmethod
    def for_schema(cls, schema: dict[str, Any]) -> JsonConstraint:
        return cls(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def any_object(cls) -> JsonConstraint:
        return cls.for_schema(ANY_OBJECT)

    def schema(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.schema_json)
        return value
