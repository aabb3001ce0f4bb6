"""How the usage log is written, compacted and where it lives."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class UsageSettings(BaseModel):
    """The usage log: Parquet segments under `directory`, catalog at `directory/usage.duckdb`.

    Layout: `<directory>/date=YYYY-MM-DD/hour=HH/instance=ID/part-*.parquet` (UTC date and
    hour of each row's `finished_at`) and the read-only catalog `<directory>/usage.duckdb`.
    A relative `directory` is resolved against the working directory of the process.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    directory: Path = Field(
        default=Path("usage"), description="Root of the Parquet tree; usage.duckdb sits in it."
    )
    flush_rows: int = Field(default=5_000, ge=1, le=1_000_000)
    flush_age_s: float = Field(
        default=5.0,
        gt=0,
        le=3_600,
        description="Flush a partial batch once its oldest row is this old.",
    )
    compact_interval_s: float = Field(
        default=0.0, ge=0, description="Run compaction this often in the service; 0 = off."
    )
    compact_after_s: float = Field(
        default=600.0,
        ge=0,
        description="An hour is closed (compactable) this long after it ends.",
    )
    compression: Literal["zstd", "snappy", "uncompressed"] = "zstd"
