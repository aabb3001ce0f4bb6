"""The one settings object: defaults < TOML file < OPSTREAM_* environment < command-line flags.

Plain pydantic models, one module per section (this module holds only `Settings`, which
gathers them, and `load_settings`); every section is re-exported here, and nothing here
imports a feature.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumer.settings.auth import AuthSettings
from consumer.settings.engine import EngineSettings, LlamaCppSettings, SchedulerSettings
from consumer.settings.exllamav2 import ExLlamaV2Settings
from consumer.settings.http import HttpSettings
from consumer.settings.intake import IntakeSettings
from consumer.settings.kafka import KafkaSecuritySettings, KafkaSettings
from consumer.settings.observability import LoggingSettings, TelemetrySettings
from consumer.settings.operations import OperationLimits
from consumer.settings.quota import QuotaSettings
from consumer.settings.streaming import StreamSettings
from consumer.settings.usage import UsageSettings
from topics.catalog import TopicSettings


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


__all__ = [
    "AuthSettings",
    "EngineSettings",
    "ExLlamaV2Settings",
    "HttpSettings",
    "IntakeSettings",
    "KafkaSecuritySettings",
    "KafkaSettings",
    "LlamaCppSettings",
    "LoggingSettings",
    "OperationLimits",
    "QuotaSettings",
    "SchedulerSettings",
    "Settings",
    "StreamSettings",
    "TelemetrySettings",
    "TopicSettings",
    "UsageSettings",
    "load_settings",
]
