"""The HTTP section: where health, readiness, metrics and admin endpoints listen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HttpSettings(BaseModel):
    """The ASGI app: health, readiness, metrics and admin endpoints."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65_535)
