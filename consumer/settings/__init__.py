"""The one settings object: defaults < TOML file < OPSTREAM_* environment < command-line flags.

Plain pydantic models, one module per section; every feature imports its section from here
and nothing here imports a feature (the engine's own section excepted: it is a plain model).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumer.settings.auth import AuthSettings
from consumer.settings.exllamav2 import ExLlamaV2Settings
from consumer.settings.kafka import KafkaSecuritySettings, KafkaSettings
from consumer.settings.observability import LoggingSettings, TelemetrySettings
from consumer.settings.quota import QuotaSettings
from consumer.settings.usage import UsageSettings
from topics.catalog import TopicSettings


class LlamaCppSettings(BaseModel):
    """The CPU engine: a GGUF file, given as a path or a Hugging Face repo + file."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = None
    hf_repo: str | None = Field(default=None, description="e.g. Qwen/Qwen2.5-7B-Instruct-GGUF")
    hf_file: str | None = Field(default=None, description="e.g. qwen2.5-7b-instruct-q4_k_m.gguf")
    n_ctx: int = Field(default=4096, ge=256, description="Context window of one sequence.")
    slots: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Sequences decoded together in one batch per step. Unset: 4 per core, 4 to 16.",
    )
    n_threads: int | None = Field(default=None, ge=1, description="Unset: every core.")
    n_batch: int = Field(default=512, ge=8)
    prefill_chunk_tokens: int = Field(
        default=128,
        ge=1,
        description="Prompt tokens one decode step takes at most (chunked prefill): bounds "
        "how long a step, and so every running sequence's next token, can take.",
    )
    seed: int = 0
    repack_weights: bool = Field(
        default=False,
        description="Let llama.cpp repack weights for the CPU's widest instructions (AMX, "
        "AVX-512). Off: some VMs advertise AMX but fault on it (SIGILL).",
    )


class SchedulerSettings(BaseModel):
    """The scheduler above every backend: its queue and how it weighs tenants' tokens."""

    model_config = ConfigDict(extra="forbid")

    max_queued: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests waiting for a slot. Unset: 16x the backend's slots, at least 64.",
    )
    output_weight: float = Field(
        default=2.0,
        gt=0,
        le=100,
        description="Fairness: a generated token counts this many prompt tokens.",
    )
    fair_preemption: bool = Field(
        default=True,
        description="When every slot is busy, a tenant below its fair share of the slots "
        "pauses the latest work of the tenant most above it (backends that can resume work: "
        "llama.cpp). Off: newcomers wait for a slot to free.",
    )
    stall_after_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Open work that makes no progress this long is a stall: /health says "
        "degraded and opstream_scheduler_stalls counts it.",
    )


class EngineSettings(BaseModel):
    """Which backend runs the model."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "llamacpp", "exllamav2"] = Field(
        default="auto", description="auto: exllamav2 when CUDA is usable, else llamacpp."
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    exllamav2: ExLlamaV2Settings = Field(default_factory=ExLlamaV2Settings)


class OperationLimits(BaseModel):
    """Per-operation bounds that are configurable (the others are fixed by the contract)."""

    model_config = ConfigDict(extra="forbid")

    chat_max_input_chars: int = Field(default=16_000, ge=1, le=200_000)
    chat_max_output_tokens: int = Field(default=1_024, ge=1, le=32_768)
    chat_max_messages: int = Field(default=64, ge=1, le=1_024)


class IntakeSettings(BaseModel):
    """How much work is in flight and how offsets are committed."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Records taken from Kafka and not yet finished. Unset: what the engine's "
        "scheduler can hold (its slots + its queue).",
    )
    commit_interval_ms: int = Field(default=50, ge=1, le=60_000)
    shutdown_grace_s: float = Field(default=30.0, ge=0)


class StreamSettings(BaseModel):
    """Streamed replies: how generated text is coalesced into chunk records."""

    model_config = ConfigDict(extra="forbid")

    chunk_tokens: int = Field(
        default=8, ge=1, le=1_000, description="A chunk is sent once it holds this many tokens"
    )
    chunk_ms: int = Field(
        default=100, ge=1, le=10_000, description="... or once its first token is this old."
    )


class HttpSettings(BaseModel):
    """The ASGI app: health, readiness, metrics and admin endpoints."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65_535)


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything opstream reads from its environment, built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="OPSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,
    )

    profile: Literal["production", "dev"] = "production"
    instance_id: str = Field(default_factory=_default_instance_id)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    security: KafkaSecuritySettings = Field(default_factory=KafkaSecuritySettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    limits: OperationLimits = Field(default_factory=OperationLimits)
    streaming: StreamSettings = Field(default_factory=StreamSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: flags (`overrides`) win over env, env over the TOML file.

    `overrides` uses the nested shape, e.g. `kafka={"bootstrap_servers": "..."}`.
    """
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    bound = type(
        "Settings",
        (Settings,),
        {"model_config": {**Settings.model_config, "toml_file": config_file}},
    )
    settings = bound(**overrides)
    return Settings.model_validate(settings.model_dump())
