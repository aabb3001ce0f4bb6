"""The provisioned Grafana dashboard, read the way a test compares it with GET /metrics.

Every query in the dashboard names opstream series by their Prometheus names
(`opstream_requests_total`, `opstream_queue_duration_milliseconds_bucket`, …); the
exposition a consumer serves must contain each of those sample names, or the panel is
empty in production with nothing to say why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "ops" / "observability" / "grafana" / "dashboards"
DASHBOARD_FILE = DASHBOARDS_DIR / "opstream.json"

# A metric name inside PromQL: not preceded by a name character, so that a label called
# `foo_opstream_x` or a `$__rate_interval` never reads as one.
_METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:$])opstream_[a-zA-Z0-9_:]*")
# PromQL string literals: label values are not series names.
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel target `expr`s and template variable queries."""
    found = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            found.append(query)
    return found


def metric_names(promql: str) -> set[str]:
    """The opstream series names one PromQL text selects (`_bucket`/`_sum`/`_count` kept)."""
    return set(_METRIC_NAME.findall(_STRING.sub('""', promql)))


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Every opstream series name any query of the dashboard selects."""
    return {name for query in queries(dashboard) for name in metric_names(query)}


def exported_series(exposition: str) -> set[str]:
    """The sample names in a Prometheus text exposition (histograms as `_bucket`, `_sum`, …)."""
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
