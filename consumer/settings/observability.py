"""Logs, traces and metrics: levels and formats, where spans go, whether /metrics is served."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LevelName = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
QUIET_LOGGERS: dict[str, LevelName] = {"aiokafka": "WARNING"}


class LoggingSettings(BaseModel):
    """Log level, format and optional rotating file (`Settings.logging`)."""

    model_config = ConfigDict(extra="forbid")

    level: LevelName = "INFO"
    format: Literal["json", "console"] = "json"
    file: Path | None = Field(default=None, description="Also write JSON lines here, rotated.")
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    backups: int = Field(default=5, ge=0, le=1_000)
    levels: dict[str, LevelName] = Field(
        default_factory=lambda: dict(QUIET_LOGGERS),
        description="Per-logger level overrides by name prefix, e.g. {'consumer.engine': "
        "'DEBUG'}; opstream's own loggers are all under consumer. (README, Observability).",
    )


class TelemetrySettings(BaseModel):
    """Where traces go and whether metrics are served (`Settings.telemetry`).

    Env: `OPSTREAM_TELEMETRY__OTLP_ENDPOINT=http://otel-collector:4318`, ….
    """

    model_config = ConfigDict(extra="forbid")

    service_name: str = "opstream"
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP base URL, e.g. http://otel-collector:4318 (traces go to "
        "/v1/traces). Unset: spans are not exported.",
    )
    otlp_timeout_s: float = Field(default=10.0, gt=0)
    trace_sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of new traces kept; a sampled parent wins."
    )
    prometheus_enabled: bool = Field(default=True, description="Serve GET /metrics.")
