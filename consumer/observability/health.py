"""Health and readiness over GET /health and /ready: process, model, GPU and broker state.

`/health` (liveness) answers 200 while the status is `healthy` or `degraded` and 503 when
`unhealthy`; `/ready` (readiness) answers 200 once the model is loaded and this instance owns
partitions, 503 before. Bodies are JSON; see `HealthReporter.health` and `.ready`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import psutil
from faststream.asgi import AsgiResponse, get
from faststream.asgi.types import Scope

from consumer.engine.base import EngineInfo
from consumer.json_response import json_response

logger = logging.getLogger(__name__)

HealthStatus = Literal["healthy", "degraded", "unhealthy"]
EngineInfoSource = Callable[[], EngineInfo | None]
BrokerStatusSource = Callable[[], tuple[bool, str]]
PartitionsSource = Callable[[], Collection[tuple[str, int]]]
# Batches that hold a partition up because they cannot be read (`consumer.bus.unreadable`).
UnreadableSource = Callable[[], Sequence[Mapping[str, Any]]]

_MB = 1024 * 1024


class HealthReporter:
    """Answers "is this instance alive, and can it serve?" from callables the app provides.

    `engine_info` returns the engine's info, or None before an engine exists; an engine whose
    `details` has an `error` entry failed to load. `broker_status` returns (connected, detail).
    `assigned_partitions` returns the (topic, partition) pairs this consumer owns now (aiokafka
    `TopicPartition`s qualify). `unreadable_batches` returns the batches that hold a
    partition up (each names its partition, error and what to do). `started_at` is the
    process start in unix seconds.
    """

    def __init__(
        self,
        *,
        started_at: float,
        engine_info: EngineInfoSource,
        broker_status: BrokerStatusSource,
        assigned_partitions: PartitionsSource,
        require_partitions: bool = True,
        unreadable_batches: UnreadableSource = lambda: (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.started_at = started_at
        self._unreadable_batches = unreadable_batches
        self._engine_info = engine_info
        self._broker_status = broker_status
        self._assigned_partitions = assigned_partitions
        self.require_partitions = require_partitions
        self._clock = clock
        self._process = psutil.Process()
        # The first cpu_percent() call only starts the measurement window.
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def health(self) -> dict[str, Any]:
        """The original platform's health fields plus `gpu` and `broker`.

        `status` is `unhealthy` when a probe failed or the engine reports an error,
        `degraded` while the model is not loaded, the broker is unreachable, the engine is
        stalled (open work making no progress: `engine_stalled` says how) or a batch that
        cannot be read holds a partition up (`unreadable_batches` names it), else `healthy`.
        """
        problems: list[str] = []
        info = self._probe("engine", self._engine_info, problems)
        broker = self._probe("broker", self._broker_status, problems)
        unreadable = self._probe("unreadable_batches", self._unreadable_batches, problems) or ()

        status: HealthStatus = "healthy"
        if problems or (info is not None and info.details.get("error")):
            status = "unhealthy"
        elif info is None or not info.loaded or broker is None or not broker[0] or unreadable:
            status = "degraded"
        stalled = engine_stall(info)
        if stalled is not None and status == "healthy":
            status = "degraded"

        memory = self._process.memory_info()
        body: dict[str, Any] = {
            "status": status,
            "uptime_seconds": round(max(self._clock() - self.started_at, 0.0), 3),
            "memory": {
                "rss_mb": round(memory.rss / _MB, 1),
                "percent": round(self._process.memory_percent(), 2),
                "system_percent": psutil.virtual_memory().percent,
            },
            "cpu": {
                "percent": psutil.cpu_percent(None),
                "process_percent": self._process.cpu_percent(None),
            },
            "models": [] if info is None else [_model_entry(info)],
            # Queued requests/tokens per priority, running sequences, slots (capacity).
            "scheduler": None if info is None else info.details.get("scheduler"),
            "gpu": gpu_state(info),
            "broker": {
                "connected": bool(broker and broker[0]),
                "detail": broker[1] if broker else "unknown",
            },
            # Partitions held up by a batch this instance cannot read, and what to do.
            "unreadable_batches": [dict(batch) for batch in unreadable],
        }
        if stalled is not None:
            body["engine_stalled"] = stalled
        if problems:
            body["problems"] = problems
        elif info is not None and info.details.get("error"):
            body["problems"] = [f"engine: {info.details['error']}"]
        return body

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): ready once the model is loaded and partitions are assigned."""
        problems: list[str] = []
        info = self._probe("engine", self._engine_info, problems)
        partitions = self._probe("partitions", self._assigned_partitions, problems) or ()
        model_loaded = info is not None and info.loaded and not info.details.get("error")

        reasons = list(problems)
        if not model_loaded and not problems:
            reasons.append("model not loaded")
        if self.require_partitions and not partitions:
            reasons.append("no partitions assigned")
        body: dict[str, Any] = {
            "ready": not reasons,
            "model_loaded": bool(model_loaded),
            "assigned_partitions": sorted(
                f"{topic}-{partition}" for topic, partition in partitions
            ),
        }
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def _probe(self, name: str, source: Callable[[], Any], problems: list[str]) -> Any:
        try:
            return source()
        except Exception as exc:  # a failing probe *is* the health answer
            logger.warning("health_probe_failed", extra={"probe": name}, exc_info=True)
            problems.append(f"{name}: {type(exc).__name__}")
            return None


def engine_stall(info: EngineInfo | None) -> str | None:
    """Why the engine is degraded by a stall (open work, no progress), or None."""
    scheduler = info.details.get("scheduler") if info is not None else None
    if not isinstance(scheduler, dict) or scheduler.get("stalled_s") is None:
        return None
    return (
        f"no progress for {scheduler['stalled_s']} s with {scheduler.get('running', 0)} running "
        f"and {sum(scheduler.get('queued_requests', {}).values())} queued"
    )


def _model_entry(info: EngineInfo) -> dict[str, Any]:
    return {"name": info.model, "backend": info.backend, "loaded": info.loaded}


def gpu_state(info: EngineInfo | None) -> dict[str, Any]:
    """GPU facts: the engine's own `details["gpu"]`, else torch's view if torch is loaded.

    torch is never imported here: importing it costs seconds and querying a device creates a
    CUDA context, which a CPU-only (llama.cpp) process must not pay for a health probe.
    """
    if info is not None and isinstance(info.details.get("gpu"), dict):
        return dict(info.details["gpu"])  # type: ignore[call-overload]
    torch = sys.modules.get("torch")
    if torch is None:
        return {"available": None, "source": "unknown (torch not loaded)"}
    try:
        cuda = torch.cuda
        if not cuda.is_available():
            return {"available": False, "source": "torch"}
        if not cuda.is_initialized():
            return {"available": True, "source": "torch", "device_count": cuda.device_count()}
        devices = []
        for index in range(cuda.device_count()):
            properties = cuda.get_device_properties(index)
            devices.append(
                {
                    "index": index,
                    "name": properties.name,
                    "total_mb": round(properties.total_memory / _MB, 1),
                    "allocated_mb": round(cuda.memory_allocated(index) / _MB, 1),
                    "reserved_mb": round(cuda.memory_reserved(index) / _MB, 1),
                }
            )
        return {"available": True, "source": "torch", "devices": devices}
    except RuntimeError as exc:
        return {"available": False, "source": "torch", "error": str(exc)}


def health_routes(reporter: HealthReporter) -> list[tuple[str, Any]]:
    """`[("/health", …), ("/ready", …)]` for `AsgiFastStream(broker, asgi_routes=…)`."""

    @get(include_in_schema=False, description="Liveness: process, model, GPU and broker state")
    async def health(scope: Scope) -> AsgiResponse:
        body = reporter.health()
        return json_response(body, 503 if body["status"] == "unhealthy" else 200)

    @get(include_in_schema=False, description="Readiness: model loaded and partitions assigned")
    async def ready(scope: Scope) -> AsgiResponse:
        is_ready, body = reporter.ready()
        return json_response(body, 200 if is_ready else 503)

    return [("/health", health), ("/ready", ready)]
