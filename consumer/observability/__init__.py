"""Logs, traces, metrics and health: what the service says about itself.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "HealthReporter": "consumer.observability.health",
    "Metrics": "consumer.observability.metrics",
    "Telemetry": "consumer.observability.telemetry",
    "configure_logging": "consumer.observability.logging",
    "extract_context": "consumer.observability.tracing",
    "health_routes": "consumer.observability.health",
    "inject_context": "consumer.observability.tracing",
    "log_request_finished": "consumer.observability.console",
    "trace_headers": "consumer.observability.tracing",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
