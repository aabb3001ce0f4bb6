"""JSON Schema files for every message on the bus (the AsyncAPI document of the app is
written by `opstream schema`, which knows the app; the committed copy is `ASYNCAPI_FILE`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.quota import QuotaCharge, ResetUsage, SetLimits
from schemas.replies import OperationReply, StreamChunk
from schemas.requests import (
    CancelRequest,
    ChatRequest,
    ClassifyRequest,
    ExtractRequest,
    OperationRequest,
    SummarizeRequest,
    TranslateRequest,
)
from schemas.usage import UsageRow

ASYNCAPI_FILE = Path(__file__).with_name("asyncapi.json")

MESSAGES: dict[str, Any] = {
    "operation-request": OperationRequest,
    "summarize-request": SummarizeRequest,
    "translate-request": TranslateRequest,
    "classify-request": ClassifyRequest,
    "chat-request": ChatRequest,
    "extract-request": ExtractRequest,
    "cancel-request": CancelRequest,
    "stream-chunk": StreamChunk,
    "operation-reply": OperationReply,
    "usage-row": UsageRow,
    "quota-charge": QuotaCharge,
    "limits-command-set": SetLimits,
    "limits-command-reset": ResetUsage,
}


def json_schema(message: Any) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message type."""
    if isinstance(message, type) and issubclass(message, BaseModel):
        schema = message.model_json_schema()
    else:
        schema = TypeAdapter(message).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(out: Path) -> list[Path]:
    """Write `<name>.schema.json` per message into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, message in MESSAGES.items():
        path = out / f"{name}.schema.json"
        path.write_text(render(json_schema(message)), encoding="utf-8")
        written.append(path)
    return written
