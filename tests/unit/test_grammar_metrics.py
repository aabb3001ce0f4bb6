"""The compiled-grammar cache's hits, misses and refusals reach Prometheus, read from the
engine's details like the scheduler's counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.engine.base import EngineInfo
from consumer.observability.engine_gauges import grammar_cache_counts
from consumer.observability.telemetry import Telemetry
from consumer.settings import TelemetrySettings


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry(TelemetrySettings(), instance_id="test-1")
    yield telemetry
    telemetry.shutdown()


def lookups(text: str) -> dict[str, float]:
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "opstream_grammar_cache_lookups_total"
    }


def test_grammar_cache_lookups_are_exported_by_result(telemetry: Telemetry) -> None:
    cache = {"hits": 33, "misses": 11, "refused": 2, "size": 11, "capacity": 128}
    info = EngineInfo("llamacpp", "smol", True, {"grammar_cache": cache})
    telemetry.metrics.set_engine_info_source(lambda: info)
    assert lookups(telemetry.prometheus_text().decode()) == {"hit": 33, "miss": 11, "refused": 2}


def test_no_series_before_the_first_constrained_request(telemetry: Telemetry) -> None:
    info = EngineInfo("llamacpp", "smol", True, {"grammar_cache": None})
    telemetry.metrics.set_engine_info_source(lambda: info)
    assert lookups(telemetry.prometheus_text().decode()) == {}
    assert grammar_cache_counts(None) == {}
