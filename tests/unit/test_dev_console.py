"""What `opstream dev` tells a person: the startup banner and the model-loading lines."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from consumer.cli.dev import dev_banner
from consumer.engine import factory
from consumer.settings import Settings
from topics.ensure import EnsureResult


def test_dev_banner_says_broker_model_auth_catalog_and_how_to_send(tmp_path: Path) -> None:
    model = tmp_path / "qwen.gguf"
    settings = Settings(
        profile="dev",
        kafka={"bootstrap_servers": "127.0.0.1:41081"},  # type: ignore[arg-type]
        auth={"required": False},  # type: ignore[arg-type]
        usage={"directory": tmp_path / "usage"},  # type: ignore[arg-type]
        engine={"backend": "llamacpp", "llamacpp": {"model_path": model}},  # type: ignore[arg-type]
    )
    topics = [
        EnsureResult("ops.requests.v1", "created", 12, 12),
        EnsureResult("ops.replies.v1", "exists", 12, 12),
    ]
    banner = dev_banner(settings, topics, embedded=True)
    assert "127.0.0.1:41081 (embedded Tansu, in memory); 2 topics, 1 created" in banner
    assert f"llama.cpp on the CPU: {model}" in banner
    assert "auth   OFF" in banner
    assert str(tmp_path / "usage" / "usage.duckdb") in banner
    assert "opstream request summarize --bootstrap-servers 127.0.0.1:41081 --tenant demo" in banner
    assert "\x1b" not in banner


def test_model_loading_line_names_the_model_and_its_size_before_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import consumer.engine.llamacpp as llamacpp

    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"\0" * 3_000_000)
    seen: list[str] = []

    class Loaded(Exception):
        """Stands for the (slow) model load; the engine is not needed here."""

    class FakeBackend:
        def __init__(self, path: Path, **_: Any) -> None:
            seen.extend(r.getMessage() for r in caplog.records)
            raise Loaded

    monkeypatch.setattr(llamacpp, "LlamaCppBackend", FakeBackend)
    settings = Settings(
        engine={"backend": "llamacpp", "llamacpp": {"model_path": model}}  # type: ignore[arg-type]
    )
    with caplog.at_level(logging.INFO, logger="consumer.engine"), pytest.raises(Loaded):
        factory.load_engine(settings)
    assert seen == ["model_loading"]  # said before the (possibly slow) load began
    [record] = caplog.records
    assert (record.model, record.size_mb) == ("tiny.gguf", 3)  # type: ignore[attr-defined]


def test_a_second_signal_does_not_skip_the_draining_shutdown() -> None:
    import signal

    import uvicorn

    from consumer.cli.server import DrainingServer

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")

    server = DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=35, log_config=None))
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)  # Ctrl-C again, or a supervisor repeating it
    assert not server.force_exit  # uvicorn would force-exit and cancel the drain
