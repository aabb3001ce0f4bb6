"""GET /health and /ready report the documented fields and flip status codes at the right time."""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import pytest
from faststream.asgi import AsgiFastStream

from consumer.engine.base import EngineInfo
from consumer.observability.health import HealthReporter, gpu_state, health_routes

LOADED = EngineInfo(backend="llamacpp", model="qwen2.5-7b-instruct-q4_k_m", loaded=True)


class World:
    """The mutable state the reporter's callables read, as the app would expose it."""

    def __init__(self) -> None:
        self.engine: EngineInfo | None = None
        self.broker: tuple[bool, str] = (True, "connected to localhost:9092")
        self.partitions: set[tuple[str, int]] = set()
        self.now = 1_000.0

    def reporter(self, **kwargs: Any) -> HealthReporter:
        return HealthReporter(
            started_at=900.0,
            engine_info=lambda: self.engine,
            broker_status=lambda: self.broker,
            assigned_partitions=lambda: self.partitions,
            clock=lambda: self.now,
            **kwargs,
        )


async def get_json(app: Any, path: str) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])


def routes(reporter: HealthReporter) -> dict[str, Any]:
    return dict(health_routes(reporter))


async def test_health_reports_the_original_platform_fields_plus_gpu_and_broker() -> None:
    world = World()
    world.engine = LOADED
    status, headers, body = await get_json(routes(world.reporter())["/health"], "/health")

    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert body["status"] == "healthy"
    assert body["uptime_seconds"] == 100.0
    assert body["memory"]["rss_mb"] > 0
    assert 0 < body["memory"]["percent"] <= 100
    assert 0 <= body["cpu"]["percent"] <= 100
    assert body["models"] == [
        {"name": "qwen2.5-7b-instruct-q4_k_m", "backend": "llamacpp", "loaded": True}
    ]
    assert "available" in body["gpu"]
    assert body["broker"] == {"connected": True, "detail": "connected to localhost:9092"}


@pytest.mark.parametrize(
    ("engine", "broker", "expected"),
    [
        (None, (True, "ok"), "degraded"),
        (EngineInfo("exllamav2", "qwen", loaded=False), (True, "ok"), "degraded"),
        (LOADED, (False, "no route to broker"), "degraded"),
        (EngineInfo("exllamav2", "qwen", False, {"error": "CUDA OOM"}), (True, "ok"), "unhealthy"),
    ],
)
async def test_health_status_follows_model_and_broker_state(
    engine: EngineInfo | None, broker: tuple[bool, str], expected: str
) -> None:
    world = World()
    world.engine, world.broker = engine, broker
    status, _, body = await get_json(routes(world.reporter())["/health"], "/health")
    assert body["status"] == expected
    assert status == (503 if expected == "unhealthy" else 200)


async def test_a_failing_probe_makes_health_unhealthy_not_a_500() -> None:
    def broken_broker() -> tuple[bool, str]:
        raise ConnectionError("metadata request failed")

    reporter = HealthReporter(
        started_at=0.0,
        engine_info=lambda: LOADED,
        broker_status=broken_broker,
        assigned_partitions=lambda: [],
    )
    status, _, body = await get_json(routes(reporter)["/health"], "/health")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["problems"] == ["broker: ConnectionError"]
    assert body["broker"]["connected"] is False


async def test_ready_waits_for_the_model_and_for_partitions() -> None:
    world = World()
    ready = routes(world.reporter())["/ready"]

    status, _, body = await get_json(ready, "/ready")
    assert status == 503
    assert body["reasons"] == ["model not loaded", "no partitions assigned"]

    world.engine = LOADED
    status, _, body = await get_json(ready, "/ready")
    assert (status, body["reasons"]) == (503, ["no partitions assigned"])

    world.partitions = {("ops.requests.v1", 3), ("ops.requests.v1", 0)}
    status, _, body = await get_json(ready, "/ready")
    assert status == 200
    assert body == {
        "ready": True,
        "model_loaded": True,
        "assigned_partitions": ["ops.requests.v1-0", "ops.requests.v1-3"],
    }


def test_spare_instance_can_be_ready_without_partitions_when_configured() -> None:
    world = World()
    world.engine = LOADED
    assert world.reporter(require_partitions=False).ready()[0] is True
    assert world.reporter().ready()[0] is False


async def test_routes_are_served_by_faststreams_asgi_app() -> None:
    world = World()
    world.engine = LOADED
    world.partitions = {("ops.requests.v1", 0)}
    app = AsgiFastStream(asgi_routes=health_routes(world.reporter()))
    status, _, body = await get_json(app, "/ready")
    assert (status, body["ready"]) == (200, True)
    status, _, body = await get_json(app, "/health")
    assert (status, body["status"]) == (200, "healthy")


def test_gpu_state_prefers_what_the_engine_reports() -> None:
    info = EngineInfo("exllamav2", "qwen", True, {"gpu": {"name": "Tesla T4", "total_mb": 15360}})
    assert gpu_state(info) == {"name": "Tesla T4", "total_mb": 15360}


def test_gpu_state_never_imports_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpu_state(LOADED)["available"] is None
    assert "torch" not in sys.modules


def test_gpu_state_reads_an_already_loaded_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    class Properties:
        name = "Tesla T4"
        total_memory = 16 * 1024**3

    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        get_device_properties=lambda index: Properties(),
        memory_allocated=lambda index: 512 * 1024**2,
        memory_reserved=lambda index: 1024**3,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert gpu_state(None)["devices"] == [
        {
            "index": 0,
            "name": "Tesla T4",
            "total_mb": 16384.0,
            "allocated_mb": 512.0,
            "reserved_mb": 1024.0,
        }
    ]
