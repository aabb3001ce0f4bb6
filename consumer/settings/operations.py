"""The operations section: per-operation bounds an operator may change."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OperationLimits(BaseModel):
    """Per-operation bounds that are configurable (the others are fixed by the contract)."""

    model_config = ConfigDict(extra="forbid")

    chat_max_input_chars: int = Field(default=16_000, ge=1, le=200_000)
    chat_max_output_tokens: int = Field(default=1_024, ge=1, le=32_768)
    chat_max_messages: int = Field(default=64, ge=1, le=1_024)
