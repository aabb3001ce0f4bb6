"""Where the deployment files are, how they are read, and what they must agree with.

No Docker engine, Kubernetes cluster or network is available in CI, so every file is parsed
and validated offline: docker-compose.yaml against the Compose Specification schema (shipped
by check-jsonschema), the Kubernetes manifests against the Kubernetes OpenAPI-derived schemas
(shipped by kubernetes-validate), the KEDA ScaledObject against its CRD schema (vendored in
tests/fixtures/schemas/), ops/Dockerfile through BuildKit's own parser (the `dockerfile`
package) and the systemd unit through configparser. Each target has its own test module here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import yaml

from consumer.settings import HttpSettings

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "ops" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_DIR = REPO / "ops" / "k8s"
SYSTEMD_UNIT = REPO / "ops" / "systemd" / "opstream.service"
SYSTEMD_ENV = REPO / "ops" / "systemd" / "opstream.env.example"
OBSERVABILITY_DIR = REPO / "ops" / "observability"
KEDA_SCHEMA = REPO / "tests" / "fixtures" / "schemas" / "keda-scaledobject-v1alpha1.json"
# What the service itself says; the deployment files must agree with it.
HTTP_PORT = HttpSettings().port
GRACE_SETTING = "OPSTREAM_INTAKE__SHUTDOWN_GRACE_S"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def schema_errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        env[key.strip()] = value.strip()
    return env


def compose_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def final_stage_entrypoint(stages: list[list[dockerfile.Command]]) -> list[str]:
    entrypoints = [c for c in stages[-1] if c.cmd == "ENTRYPOINT"]
    assert entrypoints, "final stage has no ENTRYPOINT"
    assert entrypoints[-1].json, "ENTRYPOINT must use the exec (JSON) form"
    return list(entrypoints[-1].value)
