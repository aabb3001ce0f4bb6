"""ops/k8s: the manifests and the KEDA ScaledObject, valid against their schemas, and the
properties that matter.

Manifests are checked against the Kubernetes OpenAPI-derived schemas (kubernetes-validate),
the ScaledObject against KEDA's CRD schema (vendored in tests/fixtures/schemas/).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from consumer.settings import KafkaSettings
from tests.unit.deployment.files import (
    GRACE_SETTING,
    HTTP_PORT,
    K8S_DIR,
    KEDA_SCHEMA,
    load_yaml,
    load_yaml_documents,
    schema_errors,
)
from topics.catalog import TopicSettings

# Oldest Kubernetes minor the manifests promise to work on.
KUBERNETES_VERSION = "1.30"
# What the service itself says; the manifests must agree with it.
CONSUMER_GROUP = KafkaSettings().group_id
REQUEST_TOPIC = TopicSettings().requests
# The most consumers of one group that can have work: one per request partition.
REQUEST_TOPIC_PARTITIONS = TopicSettings().request_partitions


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [doc for path in _k8s_files() for doc in load_yaml_documents(path)]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(K8S_DIR / "kustomization.yaml")


@pytest.fixture(scope="module")
def deployed(kustomization) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k ops/k8s` creates."""
    return [
        doc for name in kustomization["resources"] for doc in load_yaml_documents(K8S_DIR / name)
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
        for index, doc in enumerate(load_yaml_documents(path)):
            yield pytest.param(doc, id=f"{path.name}#{index}-{doc['kind']}")


@pytest.mark.parametrize("document", list(_manifest_ids()))
def test_kubernetes_manifest_is_valid_against_its_schema(document, keda_validator):
    if document["kind"] == "ScaledObject":
        assert document["apiVersion"] == "keda.sh/v1alpha1"
        assert schema_errors(keda_validator, document) == []
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
    assert schema_errors(keda_validator, broken)


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
    triggers = {t["type"]: t for t in spec["triggers"]}
    metadata = triggers["kafka"]["metadata"]
    assert metadata["consumerGroup"] == CONSUMER_GROUP
    assert metadata["topic"] == REQUEST_TOPIC
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["bootstrapServers"] == _config(deployed)["OPSTREAM_KAFKA__BOOTSTRAP_SERVERS"]


def test_keda_also_scales_on_tokens_queued_in_the_schedulers(deployed):
    import re

    from consumer.engine.base import EngineInfo
    from consumer.observability.telemetry import Telemetry
    from consumer.settings.observability import TelemetrySettings

    triggers = {t["type"]: t for t in _one(deployed, "ScaledObject")["spec"]["triggers"]}
    metadata = triggers["prometheus"]["metadata"]
    assert float(metadata["threshold"]) > 0
    (metric,) = re.findall(r"opstream_[a-z_]+", metadata["query"])
    # The query names a series the consumer really exports.
    telemetry = Telemetry(TelemetrySettings())
    scheduler = {
        "slots": 8,
        "running": 1,
        "queued_requests": {"batch": 1},
        "queued_tokens": {"batch": 5},
    }
    telemetry.metrics.set_engine_info_source(
        lambda: EngineInfo("llamacpp", "m", True, {"scheduler": scheduler})
    )
    exported = telemetry.prometheus_text().decode()
    assert re.search(rf"^{metric}{{priority=\"batch\"}} 5\.0$", exported, re.MULTILINE), exported


def test_keda_never_scales_past_the_request_topic_partitions(deployed):
    spec = _one(deployed, "ScaledObject")["spec"]
    assert spec["maxReplicaCount"] == REQUEST_TOPIC_PARTITIONS
    assert 1 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
