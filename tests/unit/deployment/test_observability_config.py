"""ops/observability: the collector, Prometheus and Grafana configs point at what compose runs."""

from __future__ import annotations

import re

from tests.unit.deployment.files import HTTP_PORT, OBSERVABILITY_DIR, compose_services, load_yaml


def test_otel_collector_pipelines_use_only_defined_components():
    config = load_yaml(OBSERVABILITY_DIR / "otel-collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} is not defined in {kind}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))


def test_otel_collector_receives_on_the_endpoint_the_consumer_exports_to(compose):
    config = load_yaml(OBSERVABILITY_DIR / "otel-collector.yaml")
    grpc_port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    endpoint = compose_services(compose)["consumer"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == f"http://otel-collector:{grpc_port}"
    assert "otel-collector" in compose_services(compose)


def test_prometheus_scrapes_the_consumer_metrics_endpoint(compose):
    config = load_yaml(OBSERVABILITY_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    opstream = jobs["opstream"]
    assert opstream.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in opstream["static_configs"] for t in group["targets"]]
    assert targets == [f"consumer:{HTTP_PORT}"]
    for job in jobs.values():
        for group in job["static_configs"]:
            for target in group["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "localhost" or host in compose_services(compose), target


def test_grafana_datasources_point_at_compose_services(compose):
    provisioning = OBSERVABILITY_DIR / "grafana" / "provisioning"
    datasources = load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    assert {d["type"] for d in datasources} == {"prometheus", "jaeger"}
    for source in datasources:
        host = re.match(r"https?://([^:/]+)", source["url"]).group(1)
        assert host in compose_services(compose)
    providers = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    assert all(p["type"] == "file" for p in providers)
