"""Static checks of the deployment files: schemas first, then the properties that matter.

No Docker engine, Kubernetes cluster or network is available in CI, so every file is parsed
and validated offline: docker-compose.yaml against the Compose Specification schema (shipped
by check-jsonschema), the Kubernetes manifests against the Kubernetes OpenAPI-derived schemas
(shipped by kubernetes-validate), the KEDA ScaledObject against its CRD schema (vendored in
tests/fixtures/schemas/), ops/Dockerfile through BuildKit's own parser (the `dockerfile`
package) and the systemd unit through configparser.
"""

from __future__ import annotations

import configparser
import copy
import importlib.resources
import json
import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from consumer.settings import HttpSettings, KafkaSettings, Settings
from topics.catalog import TopicSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "ops" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_DIR = REPO / "ops" / "k8s"
SYSTEMD_UNIT = REPO / "ops" / "systemd" / "opstream.service"
SYSTEMD_ENV = REPO / "ops" / "systemd" / "opstream.env.example"
OBSERVABILITY_DIR = REPO / "ops" / "observability"
KEDA_SCHEMA = REPO / "tests" / "fixtures" / "schemas" / "keda-scaledobject-v1alpha1.json"

# Oldest Kubernetes minor the manifests promise to work on.
KUBERNETES_VERSION = "1.30"
# What the service itself says; the deployment files must agree with it.
HTTP_PORT = HttpSettings().port
CONSUMER_GROUP = KafkaSettings().group_id
REQUEST_TOPIC = TopicSettings().requests
# The most consumers of one group that can have work: one per request partition.
REQUEST_TOPIC_PARTITIONS = TopicSettings().request_partitions
CORE_SERVICES = {"kafka", "topics-bootstrap", "consumer"}
GRACE_SETTING = "OPSTREAM_INTAKE__SHUTDOWN_GRACE_S"
# Settings the deployment files set before consumer/settings.py has wired them in. Every entry
# must still be unknown to Settings (a test checks it), so wiring one in forces its removal
# here, and from then on its name and value are checked like every other setting.
# Settings the deployment files use before the service reads them (none left).
PENDING_SETTINGS: set[str] = set()


# --- helpers -----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _schema_errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _go_duration_seconds(text: str) -> float:
    """Compose durations use Go's syntax: '1m30s', '60s', '500ms'."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


_SYSTEMD_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(min|sec|ms|us|h|m|s)?")
_SYSTEMD_UNITS = {"h": 3600.0, "min": 60.0, "m": 60.0, "sec": 1.0, "s": 1.0, None: 1.0}
_SYSTEMD_UNITS |= {"ms": 1e-3, "us": 1e-6}


def _systemd_timespan_seconds(text: str) -> float:
    """systemd time spans: '90', '60s', '1min 30s'."""
    matches = list(_SYSTEMD_SPAN.finditer(text))
    if not matches or re.sub(r"\s+", "", "".join(m.group(0) for m in matches)) != re.sub(
        r"\s+", "", text
    ):
        raise ValueError(f"not a systemd time span: {text!r}")
    return sum(float(m.group(1)) * _SYSTEMD_UNITS[m.group(2)] for m in matches)


def _systemd_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "yes", "true", "on"}:
        return True
    if lowered in {"0", "no", "false", "off"}:
        return False
    raise ValueError(f"not a systemd boolean: {value!r}")


def _env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        env[key.strip()] = value.strip()
    return env


# --- docker-compose.yaml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _published_ports(service: dict[str, Any]) -> list[Any]:
    return service.get("ports", [])


def _container_argv(service: dict[str, Any], entrypoint: list[str]) -> list[str]:
    command = service["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [*entrypoint, *command]


def test_compose_file_is_valid_against_the_compose_specification(compose, compose_validator):
    assert _schema_errors(compose_validator, compose) == []


def test_compose_schema_check_rejects_a_misspelled_service_key(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["consumer"]["restart_policy"] = "always"
    assert _schema_errors(compose_validator, broken), "schema accepted an unknown service key"


def test_compose_runs_kafka_in_kraft_mode_with_a_healthcheck(compose):
    kafka = _services(compose)["kafka"]
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
    bootstrap = _services(compose)["topics-bootstrap"]
    entrypoint = _final_stage_entrypoint(dockerfile_stages)
    argv = _container_argv(bootstrap, entrypoint)
    assert argv == ["opstream", "topics", "ensure", "--bootstrap-servers", "kafka:9092"]
    assert bootstrap["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert bootstrap["restart"] == "no"


def test_consumer_runs_from_the_ops_dockerfile_after_bootstrap_succeeded(
    compose, dockerfile_stages
):
    consumer = _services(compose)["consumer"]
    assert consumer["build"]["dockerfile"] == "ops/Dockerfile"
    assert (REPO / consumer["build"]["context"] / consumer["build"]["dockerfile"]).is_file()
    argv = _container_argv(consumer, _final_stage_entrypoint(dockerfile_stages))
    assert argv == ["opstream", "run", "--bootstrap-servers", "kafka:9092"]
    condition = consumer["depends_on"]["topics-bootstrap"]["condition"]
    assert condition == "service_completed_successfully"
    assert consumer["restart"] == "unless-stopped"


def test_consumer_reserves_an_nvidia_gpu(compose):
    devices = _services(compose)["consumer"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert gpus, "consumer has no nvidia GPU reservation"


def test_consumer_mounts_models_read_only_and_keeps_usage_on_a_volume(compose):
    consumer = _services(compose)["consumer"]
    mounts = {m["target"]: m for m in consumer["volumes"]}
    assert mounts["/models"]["read_only"] is True
    assert mounts["/var/lib/opstream"]["type"] == "volume"
    assert mounts["/var/lib/opstream"].get("read_only", False) is False
    for mount in mounts.values():
        if mount["type"] == "volume":
            assert mount["source"] in compose["volumes"]


def test_consumer_environment_selects_exllamav2_and_the_mounted_model(compose):
    env = _services(compose)["consumer"]["environment"]
    assert env["OPSTREAM_ENGINE__BACKEND"] == "exllamav2"
    assert env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"] == "/models/qwen2.5-7b-instruct-exl2"
    assert Path(env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"]).is_relative_to("/models")
    assert int(env["OPSTREAM_HTTP__PORT"]) == HTTP_PORT


def test_consumer_reads_tenant_keys_from_the_mounted_secret(compose):
    consumer = _services(compose)["consumer"]
    (secret,) = consumer["secrets"]
    assert secret["source"] in compose["secrets"]
    mounted_at = f"/run/secrets/{secret['target']}"
    assert consumer["environment"]["OPSTREAM_AUTH__KEYS_FILE"] == mounted_at
    keys_file = compose["secrets"][secret["source"]]["file"]
    # Real keys stay outside the repository; a default must not point into it.
    default = re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", keys_file)
    assert Path(default).is_absolute()


def test_consumer_healthcheck_probes_the_health_endpoint(compose):
    test = _services(compose)["consumer"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test[1:]))
    assert urls == [f"http://localhost:{HTTP_PORT}/health"]


def test_consumer_stop_grace_outlasts_the_shutdown_drain(compose):
    consumer = _services(compose)["consumer"]
    grace = float(consumer["environment"][GRACE_SETTING])
    assert _go_duration_seconds(consumer["stop_grace_period"]) > grace


def test_every_published_port_binds_loopback_only(compose):
    for name, service in _services(compose).items():
        for port in _published_ports(service):
            assert isinstance(port, dict), f"{name}: use the long port syntax to pin host_ip"
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_default_profile_publishes_only_health_port_and_kafka_external_listener(compose):
    published = {
        (name, int(port["target"]), int(port["published"]))
        for name, service in _services(compose).items()
        if not service.get("profiles")
        for port in _published_ports(service)
    }
    assert published == {("consumer", HTTP_PORT, HTTP_PORT), ("kafka", 9094, 9094)}
    kafka_env = _services(compose)["kafka"]["environment"]
    assert "EXTERNAL://localhost:9094" in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_optional_services_sit_behind_their_profiles(compose):
    by_profile: dict[str, set[str]] = {}
    for name, service in _services(compose).items():
        for profile in service.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert set(_services(compose)) - set().union(*by_profile.values()) == CORE_SERVICES
    assert by_profile == {
        "observability": {"otel-collector", "jaeger", "prometheus", "grafana"},
        "ui": {"kafka-ui"},
    }


def test_compose_references_resolve(compose):
    services = _services(compose)
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


# --- ops/observability ---------------------------------------------------------------------------


def test_otel_collector_pipelines_use_only_defined_components():
    config = _load_yaml(OBSERVABILITY_DIR / "otel-collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} is not defined in {kind}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))


def test_otel_collector_receives_on_the_endpoint_the_consumer_exports_to(compose):
    config = _load_yaml(OBSERVABILITY_DIR / "otel-collector.yaml")
    grpc_port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    endpoint = _services(compose)["consumer"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == f"http://otel-collector:{grpc_port}"
    assert "otel-collector" in _services(compose)


def test_prometheus_scrapes_the_consumer_metrics_endpoint(compose):
    config = _load_yaml(OBSERVABILITY_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    opstream = jobs["opstream"]
    assert opstream.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in opstream["static_configs"] for t in group["targets"]]
    assert targets == [f"consumer:{HTTP_PORT}"]
    for job in jobs.values():
        for group in job["static_configs"]:
            for target in group["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "localhost" or host in _services(compose), target


def test_grafana_datasources_point_at_compose_services(compose):
    provisioning = OBSERVABILITY_DIR / "grafana" / "provisioning"
    datasources = _load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    assert {d["type"] for d in datasources} == {"prometheus", "jaeger"}
    for source in datasources:
        host = re.match(r"https?://([^:/]+)", source["url"]).group(1)
        assert host in _services(compose)
    providers = _load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    assert all(p["type"] == "file" for p in providers)


# --- ops/Dockerfile and .dockerignore ------------------------------------------------------------


def _arg_defaults(commands: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for command in commands:
        if command.cmd == "ARG":
            for item in command.value:
                name, _, default = item.partition("=")
                defaults.setdefault(name, default.strip('"'))
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables[m.group(1)], text)


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


def _final_stage_entrypoint(stages: list[list[dockerfile.Command]]) -> list[str]:
    entrypoints = [c for c in stages[-1] if c.cmd == "ENTRYPOINT"]
    assert entrypoints, "final stage has no ENTRYPOINT"
    assert entrypoints[-1].json, "ENTRYPOINT must use the exec (JSON) form"
    return list(entrypoints[-1].value)


def _stage_base_images(dockerfile_commands, dockerfile_stages) -> list[str]:
    global_args = _arg_defaults(
        tuple(c for c in dockerfile_commands[: dockerfile_commands.index(dockerfile_stages[0][0])])
    )
    return [_expand(stage[0].value[0], global_args) for stage in dockerfile_stages]


def test_dockerfile_builds_on_cuda_devel_and_runs_on_cuda_runtime(
    dockerfile_commands, dockerfile_stages
):
    images = _stage_base_images(dockerfile_commands, dockerfile_stages)
    assert len(images) >= 2, "expected a multi-stage build"
    assert images[0] == "nvidia/cuda:12.4.1-devel-ubuntu22.04"
    assert re.fullmatch(r"nvidia/cuda:12\.4\.1-(base|runtime)-ubuntu22\.04", images[-1])
    build_name = dockerfile_stages[0][0].value[-1]
    copies_from_build = [
        c for c in dockerfile_stages[-1] if c.cmd == "COPY" and f"--from={build_name}" in c.flags
    ]
    assert copies_from_build, "runtime stage copies nothing from the build stage"


def test_dockerfile_compiles_exllamav2_for_the_t4_by_default(dockerfile_stages):
    build = dockerfile_stages[0]
    assert _arg_defaults(tuple(build))["TORCH_CUDA_ARCH_LIST"] == "7.5"
    env_set = [
        i for i, c in enumerate(build) if c.cmd == "ENV" and "TORCH_CUDA_ARCH_LIST" in c.value
    ]
    installs = [
        i
        for i, c in enumerate(build)
        if c.cmd == "RUN" and ".[gpu]" in shlex.split(c.value[0].replace("&&", " "))
    ]
    builds = [
        i
        for i, c in enumerate(build)
        if c.cmd == "RUN" and re.search(r"python -c .import exllamav2\b", c.value[0])
    ]
    assert installs and env_set and builds
    assert installs[0] < builds[0] and env_set[0] < builds[0]


def test_dockerfile_runtime_stage_runs_as_a_non_root_user(dockerfile_stages):
    users = [c.value[0] for c in dockerfile_stages[-1] if c.cmd == "USER"]
    assert users, "final stage never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit() and int(user) >= 1000, "use a numeric uid so runAsNonRoot can check it"


def test_dockerfile_healthcheck_probes_the_health_endpoint(dockerfile_stages):
    (healthcheck,) = [c for c in dockerfile_stages[-1] if c.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(healthcheck.value[1:]))
    assert [re.sub(r"//(localhost|127\.0\.0\.1):", "//host:", u) for u in urls] == [
        f"http://host:{HTTP_PORT}/health"
    ]


def test_dockerfile_entrypoint_is_the_opstream_cli(dockerfile_stages):
    assert _final_stage_entrypoint(dockerfile_stages) == ["opstream"]


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        # A pattern that matches a directory excludes everything below it too.
        patterns.append((negated, re.compile(f"{regex}(?:/.*)?")))
    return patterns


def _dockerignored(path: str) -> bool:
    excluded = False
    for negated, pattern in _dockerignore_patterns():
        if pattern.fullmatch(path):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile_stages):
    sources = [
        source
        for command in dockerfile_stages[0]
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags)
        for source in command.value[:-1]
    ]
    assert {"pyproject.toml", "consumer"} <= set(sources)
    for source in sources:
        assert not _dockerignored(source), f".dockerignore drops {source}, which COPY needs"
    assert not _dockerignored("consumer/engine/base.py")


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "models/qwen/model.safetensors", "x/smol.gguf", "usage"],
)
def test_dockerignore_keeps_weights_data_and_environments_out_of_the_context(path):
    assert _dockerignored(path)


# --- ops/systemd ---------------------------------------------------------------------------------


class _MultiValueDict(dict):
    """Lets configparser keep every value of a repeated key, as systemd does."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


@pytest.fixture(scope="module")
def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        dict_type=_MultiValueDict,
        strict=False,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    return parser


def _values(unit: configparser.RawConfigParser, key: str) -> list[str]:
    raw = unit.get("Service", key, fallback=None)
    return [] if raw is None else raw.split("\n")


def test_systemd_unit_runs_the_consumer_as_a_dedicated_user(unit):
    service = unit["Service"]
    assert service["User"] not in {"", "root", "0"}
    assert shlex.split(service["ExecStart"])[-1:] == ["run"]
    assert Path(shlex.split(service["ExecStart"])[0]).name == "opstream"
    assert service["EnvironmentFile"] == "/etc/opstream/opstream.env"
    assert service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_is_sandboxed(unit):
    service = unit["Service"]
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules"):
        assert _systemd_bool(service[flag]), flag
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert "@system-service" in service["SystemCallFilter"].split()
    families = set(service["RestrictAddressFamilies"].split())
    assert "AF_INET" in families and families <= {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_systemd_unit_can_write_only_the_usage_directory(unit):
    writable = [Path(p.lstrip("-")) for v in _values(unit, "ReadWritePaths") for p in v.split()]
    usage_dir = Path("/var/lib/opstream/usage")
    assert any(usage_dir.is_relative_to(p) for p in writable)
    assert all(p.is_relative_to("/var/lib/opstream") for p in writable)


def test_systemd_unit_allows_the_nvidia_devices_and_nothing_else(unit):
    service = unit["Service"]
    assert service["DevicePolicy"] == "closed"
    allowed = {v.split()[0] for v in _values(unit, "DeviceAllow")}
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"} <= allowed
    assert all(device.startswith("/dev/nvidia") for device in allowed)
    # PrivateDevices would hide /dev/nvidia*; MemoryDenyWriteExecute breaks CUDA's JIT.
    assert not _systemd_bool(service.get("PrivateDevices", "no"))
    assert not _systemd_bool(service.get("MemoryDenyWriteExecute", "no"))


def test_systemd_stop_timeout_outlasts_the_shutdown_drain(unit):
    grace = float(_env_file(SYSTEMD_ENV)[GRACE_SETTING])
    assert _systemd_timespan_seconds(unit["Service"]["TimeoutStopSec"]) > grace


def test_systemd_example_env_configures_the_gpu_engine_and_keys():
    env = _env_file(SYSTEMD_ENV)
    assert all(k.startswith(("OPSTREAM_", "OTEL_")) for k in env)
    assert env["OPSTREAM_ENGINE__BACKEND"] == "exllamav2"
    assert Path(env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"]).is_absolute()
    assert Path(env["OPSTREAM_AUTH__KEYS_FILE"]).is_absolute()
    assert env["OPSTREAM_HTTP__HOST"] == "127.0.0.1"
    assert int(env["OPSTREAM_HTTP__PORT"]) == HTTP_PORT


# --- ops/k8s -------------------------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [doc for path in _k8s_files() for doc in _load_yaml_documents(path)]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return _load_yaml(K8S_DIR / "kustomization.yaml")


@pytest.fixture(scope="module")
def deployed(kustomization) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k ops/k8s` creates."""
    return [
        doc for name in kustomization["resources"] for doc in _load_yaml_documents(K8S_DIR / name)
    ]


@pytest.fixture(scope="module")
def keda_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _kubernetes_errors(document: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(map(str, error.absolute_path)) or "<root>"
        return [f"{path}: {error.message}"]
    return []


def _manifest_ids() -> Iterator[Any]:
    for path in _k8s_files():
        for index, doc in enumerate(_load_yaml_documents(path)):
            yield pytest.param(doc, id=f"{path.name}#{index}-{doc['kind']}")


@pytest.mark.parametrize("document", list(_manifest_ids()))
def test_kubernetes_manifest_is_valid_against_its_schema(document, keda_validator):
    if document["kind"] == "ScaledObject":
        assert document["apiVersion"] == "keda.sh/v1alpha1"
        assert _schema_errors(keda_validator, document) == []
    else:
        assert _kubernetes_errors(document) == []


def test_kubernetes_schema_check_rejects_a_misspelled_probe(deployed):
    broken = copy.deepcopy(_one(deployed, "Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    assert _kubernetes_errors(broken), "strict schema accepted an unknown container field"


def test_keda_schema_check_rejects_a_non_string_trigger_setting(deployed, keda_validator):
    broken = copy.deepcopy(_one(deployed, "ScaledObject"))
    broken["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 32
    assert _schema_errors(keda_validator, broken)


def test_kustomization_lists_every_manifest_except_the_secret_template(kustomization):
    listed = set(kustomization["resources"])
    assert all((K8S_DIR / name).is_file() for name in listed)
    expected = {p.name for p in _k8s_files() if not p.name.endswith(".example.yaml")}
    assert listed == expected


def test_every_manifest_lives_in_the_kustomization_namespace(manifests, kustomization):
    namespace = kustomization["namespace"]
    _one(manifests, "Namespace", namespace)
    for doc in manifests:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


def test_secret_template_holds_only_placeholders(manifests, kustomization):
    secret = _one(manifests, "Secret")
    assert secret.get("data") is None, "base64 data would hide a real value"
    assert secret["stringData"] and all(v == "REPLACE_ME" for v in secret["stringData"].values())


def _pod_spec(deployed: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(deployed, "Deployment")["spec"]["template"]["spec"]


def _container(deployed: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod_spec(deployed)["containers"]
    return container


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return match


def _config(deployed: list[dict[str, Any]]) -> dict[str, str]:
    (source,) = _container(deployed)["envFrom"]
    return _one(deployed, "ConfigMap", source["configMapRef"]["name"])["data"]


def test_deployment_requests_one_gpu_on_gpu_nodes(deployed):
    pod = _pod_spec(deployed)
    resources = _container(deployed)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == resources["limits"]["nvidia.com/gpu"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_deployment_probes_health_and_readiness_on_the_http_port(deployed):
    container = _container(deployed)
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _resolve_port(container, get["port"]) == HTTP_PORT
    assert int(_config(deployed)["OPSTREAM_HTTP__PORT"]) == HTTP_PORT


def test_deployment_grace_period_outlasts_the_shutdown_drain(deployed):
    grace = float(_config(deployed)[GRACE_SETTING])
    assert _pod_spec(deployed)["terminationGracePeriodSeconds"] > grace


def test_deployment_runs_non_root_with_a_read_only_root_filesystem(deployed, dockerfile_stages):
    pod_security = _pod_spec(deployed)["securityContext"]
    container_security = _container(deployed)["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    image_uid = [c.value[0] for c in dockerfile_stages[-1] if c.cmd == "USER"][-1].split(":")[0]
    assert pod_security["runAsUser"] == int(image_uid)
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_deployment_volumes_resolve_to_manifests(deployed, manifests):
    volumes = {v["name"]: v for v in _pod_spec(deployed)["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(deployed)["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    for path in ("/models", "/var/lib/opstream"):
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        _one(deployed, "PersistentVolumeClaim", claim)
    keys_file = Path(_config(deployed)["OPSTREAM_AUTH__KEYS_FILE"])
    keys_mount = mounts[str(keys_file.parent)]
    assert keys_mount["readOnly"] is True
    secret_name = volumes[keys_mount["name"]]["secret"]["secretName"]
    assert keys_file.name in _one(manifests, "Secret", secret_name)["stringData"]


def test_service_and_disruption_budget_select_the_consumer_pods(deployed):
    deployment = _one(deployed, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = _one(deployed, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == HTTP_PORT
    assert _resolve_port(_container(deployed), port["targetPort"]) == HTTP_PORT
    pdb = _one(deployed, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_keda_scales_the_deployment_on_request_topic_lag(deployed):
    scaled = _one(deployed, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _one(deployed, "Deployment")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert metadata["consumerGroup"] == CONSUMER_GROUP
    assert metadata["topic"] == REQUEST_TOPIC
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["bootstrapServers"] == _config(deployed)["OPSTREAM_KAFKA__BOOTSTRAP_SERVERS"]


def test_keda_never_scales_past_the_request_topic_partitions(deployed):
    spec = _one(deployed, "ScaledObject")["spec"]
    assert spec["maxReplicaCount"] == REQUEST_TOPIC_PARTITIONS
    assert 1 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]


# --- settings names and values against consumer/settings.py -------------------------------------


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
    compose = _load_yaml(COMPOSE_FILE)
    yield pytest.param(compose["services"]["consumer"]["environment"], id="compose")
    yield pytest.param(_load_yaml(K8S_DIR / "configmap.yaml")["data"], id="k8s-configmap")
    yield pytest.param(_env_file(SYSTEMD_ENV), id="systemd-env")


@pytest.mark.parametrize("env", list(_deployment_environments()))
def test_every_opstream_variable_names_a_real_setting(env):
    unknown = {
        name for name in env if name.startswith("OPSTREAM_") and not _settings_path_exists(name)
    }
    assert unknown <= PENDING_SETTINGS, f"not settings (silently ignored): {unknown}"


@pytest.mark.parametrize("env", list(_deployment_environments()))
def test_settings_parse_from_each_deployment_environment(env, monkeypatch):
    import os

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
