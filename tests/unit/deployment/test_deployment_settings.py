"""Every OPSTREAM_* variable the deployment files set names a real setting, and each set parses."""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from consumer.settings import Settings
from tests.unit.deployment.files import (
    COMPOSE_FILE,
    GRACE_SETTING,
    HTTP_PORT,
    K8S_DIR,
    SYSTEMD_ENV,
    env_file,
    load_yaml,
)

# Settings the deployment files set before consumer/settings.py has wired them in. Every entry
# must still be unknown to Settings (a test checks it), so wiring one in forces its removal
# here, and from then on its name and value are checked like every other setting.
# Settings the deployment files use before the service reads them (none left).
PENDING_SETTINGS: set[str] = set()


def _settings_path_exists(name: str) -> bool:
    """True when OPSTREAM_A__B__C names the field settings.a.b.c."""
    model: type[BaseModel] = Settings
    parts = name.removeprefix("OPSTREAM_").lower().split("__")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        nested = [
            t
            for t in (annotation, *typing.get_args(annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if depth == len(parts) - 1:
            # A whole section from one variable (OPSTREAM_ENGINE=...) is not what is meant.
            return not nested
        if not nested:
            return False
        model = nested[0]
    return False


def _deployment_environments() -> Iterator[Any]:
    compose = load_yaml(COMPOSE_FILE)
    yield pytest.param(compose["services"]["consumer"]["environment"], id="compose")
    yield pytest.param(load_yaml(K8S_DIR / "configmap.yaml")["data"], id="k8s-configmap")
    yield pytest.param(env_file(SYSTEMD_ENV), id="systemd-env")


@pytest.mark.parametrize("env", list(_deployment_environments()))
def test_every_opstream_variable_names_a_real_setting(env):
    unknown = {
        name for name in env if name.startswith("OPSTREAM_") and not _settings_path_exists(name)
    }
    assert unknown <= PENDING_SETTINGS, f"not settings (silently ignored): {unknown}"


@pytest.mark.parametrize("env", list(_deployment_environments()))
def test_settings_parse_from_each_deployment_environment(env, monkeypatch):

    for name in list(os.environ):
        if name.startswith("OPSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("OPSTREAM_") and name not in PENDING_SETTINGS:
            monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.engine.backend == "exllamav2"
    assert settings.http.port == HTTP_PORT
    assert settings.intake.shutdown_grace_s == float(env[GRACE_SETTING])
    assert settings.profile == "production"
