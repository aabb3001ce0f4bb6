"""The parsed deployment files that more than one target's tests read."""

from __future__ import annotations

from typing import Any

import dockerfile
import pytest

from tests.unit.deployment.files import COMPOSE_FILE, DOCKERFILE, load_yaml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def dockerfile_commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


@pytest.fixture(scope="module")
def dockerfile_stages(dockerfile_commands) -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for command in dockerfile_commands:
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages
