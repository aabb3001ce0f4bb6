"""Streamed replies: generated text coalesced into chunk records, sent in order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

SendChunk = Callable[[int, str], Awaitable[None]]
"""(seq, delta) -> the chunk record is acknowledged."""


class ChunkStream:
    """Collects text deltas (one per generated token) and sends them as numbered chunks.

    A chunk goes out once it holds `chunk_tokens` deltas or its first delta is `chunk_ms`
    old, whichever comes first, so a reply topic sees a few records per second per request,
    not one per token. Chunks are sent one after another by a single task (in `seq` order);
    `close()` sends the rest and waits, so the final reply always follows the last chunk.
    A chunk that cannot be sent stops the stream (the final reply still goes out).
    """

    def __init__(self, send: SendChunk, *, chunk_tokens: int, chunk_ms: int) -> None:
        self._send = send
        self._chunk_tokens = chunk_tokens
        self._chunk_s = chunk_ms / 1000
        self._buffer: list[str] = []
        self._ready: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._seq = 0
        self._sender: asyncio.Task[None] | None = None
        self._failed = False

    @property
    def chunks(self) -> int:
        """Chunks handed to the sender so far."""
        return self._seq

    def push(self, delta: str) -> None:
        """Add generated text (called on the event loop, by the engine's text observer)."""
        if self._failed or not delta:
            return
        self._buffer.append(delta)
        if len(self._buffer) >= self._chunk_tokens:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._chunk_s, self._flush)

    async def close(self) -> int:
        """Send what is left and wait until every chunk is acknowledged; the chunk count."""
        self._flush()
        if self._sender is not None:
            self._ready.put_nowait(None)
            await self._sender
        return self._seq

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._failed:
            return
        self._seq += 1
        self._ready.put_nowait((self._seq, "".join(self._buffer)))
        self._buffer.clear()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_in_order(), name="opstream-chunks")

    async def _send_in_order(self) -> None:
        while (item := await self._ready.get()) is not None:
            if self._failed:
                continue
            seq, delta = item
            try:
                await self._send(seq, delta)
            except Exception as exc:
                self._failed = True
                log.warning("stream_chunk_failed", extra={"seq": seq, "error": type(exc).__name__})
