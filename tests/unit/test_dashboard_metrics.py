"""The Grafana dashboard queries only series the consumer's telemetry exports.

Fast and offline: one `Telemetry` records one of everything, and its exposition is compared
with every query in ops/observability/grafana/dashboards/opstream.json.
tests/integration/test_security_telemetry.py makes the same check against GET /metrics of a
running consumer.
"""

from __future__ import annotations

from consumer.engine.base import EngineInfo
from consumer.observability.telemetry import Telemetry, TelemetrySettings
from tests.support.dashboard import (
    dashboard_metric_names,
    exported_series,
    load_dashboard,
    metric_names,
)


def test_metric_names_keep_histogram_suffixes_and_skip_labels_variables_and_strings() -> None:
    query = (
        "histogram_quantile(0.95, sum by (le, opstream_label) ("
        'rate(opstream_queue_duration_milliseconds_bucket{instance=~"$instance", '
        "code='opstream_not_a_metric'}[$__rate_interval])))"
        " / on() group_left opstream_requests_total"
    )
    assert metric_names(query) == {
        "opstream_queue_duration_milliseconds_bucket",
        "opstream_label",  # a label named like a metric counts: better a false alarm than none
        "opstream_requests_total",
    }


def test_a_misspelled_series_in_a_dashboard_is_reported_missing() -> None:
    dashboard = {
        "panels": [{"type": "timeseries", "targets": [{"expr": "opstream_request_total"}]}]
    }
    exported = {"opstream_requests_total"}
    assert dashboard_metric_names(dashboard) - exported == {"opstream_request_total"}


def test_every_series_the_dashboard_queries_is_exported_by_the_consumer_telemetry() -> None:
    telemetry = Telemetry(TelemetrySettings())
    metrics = telemetry.metrics
    metrics.count_request("chat", "ok")
    metrics.count_tokens("chat", input_tokens=12, output_tokens=3)
    metrics.observe_stages(
        "chat",
        {"bus_ms": 1, "admission_ms": 1, "slot_wait_ms": 2, "prefill_ms": 30, "total_ms": 80},
    )
    metrics.observe_batch_size(4, backend="exllamav2")
    metrics.count_quota_rejection("chat", limit="requests")
    metrics.set_lag_source(lambda: {("ops.requests.v1", 0): 3})
    gpu = {"index": 0, "name": "Tesla T4", "memory_used_bytes": 9, "memory_total_bytes": 16}
    info = EngineInfo("exllamav2", "m", True, {"gpus": [gpu]})
    metrics.set_engine_info_source(lambda: info)
    with metrics.track_in_flight("chat"):
        exported = exported_series(telemetry.prometheus_text().decode())
    telemetry.shutdown()

    missing = dashboard_metric_names(load_dashboard()) - exported
    assert not missing, f"the dashboard queries series the consumer does not export: {missing}"
