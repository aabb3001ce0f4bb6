"""Start-up errors of the exllamav2 engine."""

from __future__ import annotations


class EngineConfigError(Exception):
    """The engine cannot start with these settings here; the message says what to change."""

    code = "engine_config"
