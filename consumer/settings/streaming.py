"""The streaming section: how generated text is coalesced into chunk records."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamSettings(BaseModel):
    """Streamed replies: how generated text is coalesced into chunk records."""

    model_config = ConfigDict(extra="forbid")

    chunk_tokens: int = Field(
        default=8, ge=1, le=1_000, description="A chunk is sent once it holds this many tokens"
    )
    chunk_ms: int = Field(
        default=100, ge=1, le=10_000, description="... or once its first token is this old."
    )
