"""docker-compose.yaml: valid against the Compose Specification, and the properties that matter."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.unit.deployment.files import (
    GRACE_SETTING,
    HTTP_PORT,
    REPO,
    compose_services,
    final_stage_entrypoint,
    schema_errors,
)

CORE_SERVICES = {"kafka", "topics-bootstrap", "consumer"}

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _go_duration_seconds(text: str) -> float:
    """Compose durations use Go's syntax: '1m30s', '60s', '500ms'."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _published_ports(service: dict[str, Any]) -> list[Any]:
    return service.get("ports", [])


def _container_argv(service: dict[str, Any], entrypoint: list[str]) -> list[str]:
    command = service["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [*entrypoint, *command]


def test_compose_file_is_valid_against_the_compose_specification(compose, compose_validator):
    assert schema_errors(compose_validator, compose) == []


def test_compose_schema_check_rejects_a_misspelled_service_key(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["consumer"]["restart_policy"] = "always"
    assert schema_errors(compose_validator, broken), "schema accepted an unknown service key"


def test_compose_runs_kafka_in_kraft_mode_with_a_healthcheck(compose):
    kafka = compose_services(compose)["kafka"]
    assert kafka["image"].split(":")[0] == "apache/kafka"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert not any("ZOOKEEPER" in key for key in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    healthcheck = kafka["healthcheck"]
    assert not healthcheck.get("disable", False)
    assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}


def test_topic_bootstrap_runs_once_after_kafka_is_healthy(compose, dockerfile_stages):
    bootstrap = compose_services(compose)["topics-bootstrap"]
    entrypoint = final_stage_entrypoint(dockerfile_stages)
    argv = _container_argv(bootstrap, entrypoint)
    assert argv == ["opstream", "topics", "ensure", "--bootstrap-servers", "kafka:9092"]
    assert bootstrap["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert bootstrap["restart"] == "no"


def test_consumer_runs_from_the_ops_dockerfile_after_bootstrap_succeeded(
    compose, dockerfile_stages
):
    consumer = compose_services(compose)["consumer"]
    assert consumer["build"]["dockerfile"] == "ops/Dockerfile"
    assert (REPO / consumer["build"]["context"] / consumer["build"]["dockerfile"]).is_file()
    argv = _container_argv(consumer, final_stage_entrypoint(dockerfile_stages))
    assert argv == ["opstream", "run", "--bootstrap-servers", "kafka:9092"]
    condition = consumer["depends_on"]["topics-bootstrap"]["condition"]
    assert condition == "service_completed_successfully"
    assert consumer["restart"] == "unless-stopped"


def test_consumer_reserves_an_nvidia_gpu(compose):
    devices = compose_services(compose)["consumer"]["deploy"]["resources"]["reservations"][
        "devices"
    ]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert gpus, "consumer has no nvidia GPU reservation"


def test_consumer_mounts_models_read_only_and_keeps_usage_on_a_volume(compose):
    consumer = compose_services(compose)["consumer"]
    mounts = {m["target"]: m for m in consumer["volumes"]}
    assert mounts["/models"]["read_only"] is True
    assert mounts["/var/lib/opstream"]["type"] == "volume"
    assert mounts["/var/lib/opstream"].get("read_only", False) is False
    for mount in mounts.values():
        if mount["type"] == "volume":
            assert mount["source"] in compose["volumes"]


def test_consumer_environment_selects_exllamav2_and_the_mounted_model(compose):
    env = compose_services(compose)["consumer"]["environment"]
    assert env["OPSTREAM_ENGINE__BACKEND"] == "exllamav2"
    assert env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"] == "/models/qwen2.5-7b-instruct-exl2"
    assert Path(env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"]).is_relative_to("/models")
    assert int(env["OPSTREAM_HTTP__PORT"]) == HTTP_PORT


def test_consumer_reads_tenant_keys_from_the_mounted_secret(compose):
    consumer = compose_services(compose)["consumer"]
    (secret,) = consumer["secrets"]
    assert secret["source"] in compose["secrets"]
    mounted_at = f"/run/secrets/{secret['target']}"
    assert consumer["environment"]["OPSTREAM_AUTH__KEYS_FILE"] == mounted_at
    keys_file = compose["secrets"][secret["source"]]["file"]
    # Real keys stay outside the repository; a default must not point into it.
    default = re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", keys_file)
    assert Path(default).is_absolute()


def test_consumer_healthcheck_probes_the_health_endpoint(compose):
    test = compose_services(compose)["consumer"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test[1:]))
    assert urls == [f"http://localhost:{HTTP_PORT}/health"]


def test_consumer_stop_grace_outlasts_the_shutdown_drain(compose):
    consumer = compose_services(compose)["consumer"]
    grace = float(consumer["environment"][GRACE_SETTING])
    assert _go_duration_seconds(consumer["stop_grace_period"]) > grace


def test_every_published_port_binds_loopback_only(compose):
    for name, service in compose_services(compose).items():
        for port in _published_ports(service):
            assert isinstance(port, dict), f"{name}: use the long port syntax to pin host_ip"
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_default_profile_publishes_only_health_port_and_kafka_external_listener(compose):
    published = {
        (name, int(port["target"]), int(port["published"]))
        for name, service in compose_services(compose).items()
        if not service.get("profiles")
        for port in _published_ports(service)
    }
    assert published == {("consumer", HTTP_PORT, HTTP_PORT), ("kafka", 9094, 9094)}
    kafka_env = compose_services(compose)["kafka"]["environment"]
    assert "EXTERNAL://localhost:9094" in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_optional_services_sit_behind_their_profiles(compose):
    by_profile: dict[str, set[str]] = {}
    for name, service in compose_services(compose).items():
        for profile in service.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert set(compose_services(compose)) - set().union(*by_profile.values()) == CORE_SERVICES
    assert by_profile == {
        "observability": {"otel-collector", "jaeger", "prometheus", "grafana"},
        "ui": {"kafka-ui"},
    }


def test_compose_references_resolve(compose):
    services = compose_services(compose)
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        for dependency in depends_on if isinstance(depends_on, list) else depends_on.keys():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert not services[dependency].get("profiles") or service.get("profiles"), (
                f"core service {name} depends on optional {dependency}"
            )
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                assert (REPO / mount["source"]).exists(), f"{name}: missing {mount['source']}"
