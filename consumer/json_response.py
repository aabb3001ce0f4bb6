"""The one JSON response of every HTTP endpoint (health, readiness, the admin API)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from faststream.asgi import AsgiResponse
from pydantic import BaseModel


def json_response(
    body: BaseModel | Mapping[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> AsgiResponse:
    """`body` as JSON with `status`; never cached (every answer says how things are now)."""
    if isinstance(body, BaseModel):
        payload = body.model_dump_json().encode()
    else:
        payload = json.dumps(body, default=str).encode()
    return AsgiResponse(
        payload,
        status_code=status,
        headers={
            "Content-Type": "application/json",
            "Cache-Control": "no-store",
            **(headers or {}),
        },
    )
