"""ops/observability: the collector, Prometheus and Grafana configs point at what compose runs."""

from __future__ import annotations

import re

from tests.support.dashboard import (
    DASHBOARD_FILE,
    DASHBOARDS_DIR,
    dashboard_metric_names,
    load_dashboard,
    metric_names,
    panels,
    queries,
)
from tests.unit.deployment.files import (
    COMPOSE_FILE,
    HTTP_PORT,
    OBSERVABILITY_DIR,
    compose_services,
    load_yaml,
)


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


def prometheus_datasource_uid() -> str:
    provisioning = OBSERVABILITY_DIR / "grafana" / "provisioning"
    datasources = load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    return prometheus["uid"]


def test_grafana_loads_the_dashboard_folder_that_compose_mounts(compose):
    provisioning = OBSERVABILITY_DIR / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    mounts = {
        volume["target"]: volume
        for volume in compose_services(compose)["grafana"]["volumes"]
        if volume["type"] == "bind"
    }
    mount = mounts[provider["options"]["path"]]
    assert (COMPOSE_FILE.parent / mount["source"]).resolve() == DASHBOARDS_DIR
    assert mount.get("read_only") is True
    assert DASHBOARD_FILE.parent == DASHBOARDS_DIR and DASHBOARD_FILE.is_file()


def test_every_dashboard_panel_queries_the_provisioned_prometheus_by_uid():
    dashboard = load_dashboard()
    uid = prometheus_datasource_uid()
    assert dashboard["uid"] and dashboard["title"]
    charts = [panel for panel in panels(dashboard) if panel["type"] != "row"]
    assert charts
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    for panel in charts:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], f"{title} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
            assert target["expr"].strip(), f"{title} has an empty query"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == {"type": "prometheus", "uid": uid}, variable["name"]


def test_every_dashboard_query_selects_an_opstream_series_by_its_name():
    # The metric-name test compares these names with /metrics; a query that selects its
    # series some other way (`{__name__=...}`, a foreign metric) would escape it.
    for query in queries(load_dashboard()):
        assert metric_names(query), query
        assert "__name__" not in query, query


def test_dashboard_charts_what_operators_watch():
    names = dashboard_metric_names(load_dashboard())
    assert {
        "opstream_requests_total",
        "opstream_tokens_total",
        "opstream_queue_duration_milliseconds_bucket",
        "opstream_first_token_duration_milliseconds_bucket",
        "opstream_request_duration_milliseconds_bucket",
        "opstream_requests_in_flight",
        "opstream_engine_batch_size_bucket",
        "opstream_consumer_lag",
        "opstream_quota_rejections_total",
        "opstream_gpu_memory_used_bytes",
    } <= names
