"""Serving the app over uvicorn until a signal stops it, draining in-flight work first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from consumer.app import build_app
from consumer.settings import Settings

log = logging.getLogger(__name__)


async def serve(
    settings: Settings, announce: Callable[[], None] | None = None, engine: Any = None
) -> None:
    """Serve the app (consumer + HTTP routes) until a signal stops it."""
    app = build_app(settings, engine)
    service = app.context.get("service")
    config = uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.intake.shutdown_grace_s) + 5,
    )
    server = DrainingServer(config)
    watcher = None
    if announce is not None:
        watcher = asyncio.create_task(_announce_when_ready(service, announce))
    try:
        await server.serve()
    finally:
        if watcher is not None:
            watcher.cancel()
    if server.started is False and not server.should_exit:
        raise RuntimeError("the service failed to start (see the log above)")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a handled SIGTERM/SIGINT ends with exit status 0 and a
    repeated signal never skips the draining shutdown.

    (uvicorn re-raises the signal after a graceful shutdown, so the process would report
    death by signal even though it drained and committed; and it force-exits on a second
    SIGINT, which would cancel the in-flight work mid-drain.)
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Shutdown always drains (bounded by intake.shutdown_grace_s); a repeated signal
        # only says so.
        if self.should_exit:
            log.warning(
                "shutdown_in_progress",
                extra={"grace_s": self.config.timeout_graceful_shutdown},
            )
            return
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)


async def _announce_when_ready(service: Any, announce: Callable[[], None]) -> None:
    """Call `announce` once the service reports ready (model loaded, partitions assigned)."""
    while True:
        ready, _ = service.health.ready()
        if ready:
            announce()
            return
        await asyncio.sleep(0.5)
