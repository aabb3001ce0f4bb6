"""The producer's side: `OperationsClient` publishes requests and awaits their replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from opstream_client.batch import BatchSummary, OnProgress, PathLike, run_batch
from opstream_client.tracing import default_tracer, producer_span
from schemas.headers import CHUNK_SEQ, CONTENT_TYPE, CORRELATION_ID, JSON, REPLY_TO
from schemas.replies import OperationReply, StreamChunk
from schemas.signing import Routing, sign

Signer = Callable[[bytes, str, Routing], list[tuple[str, bytes]]]
"""(body, tenant_id, (correlation bytes, reply topic, reply partition)) -> headers."""


def _hmac_signer(key_id: str, secret: str) -> Signer:
    def signer(body: bytes, tenant_id: str, routing: Routing) -> list[tuple[str, bytes]]:
        return sign(body, tenant_id, key_id, secret, time.time(), routing)

    return signer


log = logging.getLogger(__name__)


class ReplyStream:
    """A streamed reply: `async for chunk in stream` yields its StreamChunks in order, then
    `stream.reply` is the final OperationReply (ok or error).

    A chunk whose `seq` was already seen is dropped (after a consumer crash the request may
    run again and send its chunks from 1; the text of a non-greedy request may then differ
    from what was already yielded — the final reply is authoritative).
    """

    def __init__(self, start: Callable[[ReplyStream], Any], timeout_s: float) -> None:
        self.reply: OperationReply | None = None
        self._start = start
        self._timeout_s = timeout_s
        self._started: asyncio.Task[Any] | None = None
        self._items: asyncio.Queue[StreamChunk | None] = asyncio.Queue()
        self._last_seq = 0
        self._deadline = 0.0

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._started is None:
            self._deadline = time.monotonic() + self._timeout_s
            self._started = asyncio.ensure_future(self._start(self))
        if self._items.empty() and self._started.done() and self._started.exception():
            raise self._started.exception()  # type: ignore[misc]
        remaining = self._deadline - time.monotonic()
        item = await asyncio.wait_for(self._items.get(), max(0.0, remaining))
        if item is None:
            await self._started
            raise StopAsyncIteration
        return item

    def _chunk(self, chunk: StreamChunk) -> None:
        if chunk.seq <= self._last_seq:
            return
        self._last_seq = chunk.seq
        self._items.put_nowait(chunk)

    def _final(self, reply: OperationReply) -> None:
        self.reply = reply
        self._items.put_nowait(None)


class OperationsClient:
    """Send operation requests over Kafka and await each reply by correlation id.

    The client reads its reply topic by direct partition assignment (no consumer
    group), from the end, so replies for other clients sharing the topic are
    skipped, and late or duplicate replies are dropped.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        request_topic: str = "ops.requests.v1",
        reply_topic: str = "ops.replies.v1",
        timeout_s: float = 60.0,
        fetch_max_wait_ms: int = 100,
        key_id: str | None = None,
        secret: str | None = None,
        signer: Signer | None = None,
        tracer: Any = None,
        client_options: dict[str, Any] | None = None,
        retries: int = 1,
    ) -> None:
        """`key_id` + `secret` sign every request (HMAC-SHA256, see the README); a custom
        `signer(body, tenant_id, routing) -> headers` may replace them (scheme v2 signs
        the routing: correlation id bytes, reply topic, reply partition). Trace context of the
        current span is injected into each request's headers (with the OpenTelemetry API
        installed; `tracer` is an OpenTelemetry tracer). `retries`: how often `request` asks
        again after a timeout or an `in_progress` answer (see `request`)."""
        if (key_id is None) != (secret is None):
            raise ValueError("give both key_id and secret, or neither")
        if signer is None and key_id is not None and secret is not None:
            signer = _hmac_signer(key_id, secret)
        self._bootstrap = bootstrap_servers
        self._request_topic = request_topic
        self.reply_topic = reply_topic
        self._timeout_s = timeout_s
        self._retries = max(0, retries)
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._signer = signer
        self._tracer = tracer or default_tracer()
        self._options = client_options or {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._waiting: dict[str, asyncio.Future[OperationReply]] = {}
        self._streams: dict[str, ReplyStream] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OperationsClient:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", linger_ms=1, **self._options
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            **self._options,
        )
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.reply_topic) or set()
        if not partitions and self.reply_topic in await self._consumer.topics():
            # Not in the consumer's metadata yet (as `consumer.bus.topic_reader` explains):
            # assigning the topic makes the consumer fetch it.
            self._consumer.assign([TopicPartition(self.reply_topic, 0)])
            for _ in range(1000):
                partitions = self._consumer.partitions_for_topic(self.reply_topic) or set()
                if partitions:
                    break
                await asyncio.sleep(0.01)
        if not partitions:
            await self.close()
            raise RuntimeError(f"reply topic {self.reply_topic!r} does not exist")
        assignment = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(assignment)
        await self._consumer.seek_to_end(*assignment)
        for tp in assignment:  # resolve the end positions now, before any request is sent
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies(), name="opstream-client-replies")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for waiter in self._waiting.values():
            waiter.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def request(
        self,
        body: dict[str, Any],
        *,
        timeout_s: float | None = None,
        correlation_id: str | None = None,
        retries: int | None = None,
    ) -> OperationReply:
        """Publish one request body (keyed by tenant) and wait for its reply.

        No reply within the timeout, or `in_progress` (the request still runs), and it is
        sent again (`retries`, default the client's: 1) with the same `request_id` and body
        under a new correlation id: the service answers a retry of a finished request with
        its stored reply (`meta.replayed`), never running or charging it twice. A body
        without `request_id` gets the first correlation id as one, so retries share it.
        The last attempt's timeout (`TimeoutError`) or `in_progress` reply is the caller's.
        """
        attempts = 1 + (self._retries if retries is None else max(0, retries))
        correlation_id = correlation_id or str(uuid.uuid4())
        if attempts > 1 and "request_id" not in body and body.get("operation") != "cancel":
            body = {**body, "request_id": correlation_id}
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                reply = await self._request_once(
                    body, timeout_s=timeout_s, correlation_id=correlation_id
                )
            except TimeoutError:
                if last:
                    raise
            else:
                if last or reply.error is None or reply.error.code != "in_progress":
                    return reply
                await asyncio.sleep(min(0.5 * 2**attempt, 10.0))  # it is still running
            correlation_id = str(uuid.uuid4())
        raise AssertionError("unreachable")

    async def _request_once(
        self, body: dict[str, Any], *, timeout_s: float | None, correlation_id: str
    ) -> OperationReply:
        if self._producer is None:
            raise RuntimeError("client not started")
        payload = _dumps(body)
        headers = [
            (CORRELATION_ID, correlation_id.encode()),
            (REPLY_TO, self.reply_topic.encode()),
            (CONTENT_TYPE, JSON.encode()),
        ]
        if self._signer is not None:
            routing = (correlation_id.encode(), self.reply_topic, "")
            headers.extend(self._signer(payload, str(body["tenant_id"]), routing))
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = waiter
        try:
            operation = str(body.get("operation"))
            with producer_span(self._tracer, self._request_topic, operation, headers) as span:
                await self._producer.send_and_wait(
                    self._request_topic,
                    payload,
                    key=str(body["tenant_id"]).encode(),
                    headers=headers,
                )
                reply = await asyncio.wait_for(waiter, timeout_s or self._timeout_s)
                if span is not None:
                    span.set_attribute("opstream.status", reply.status)
                return reply
        finally:
            self._waiting.pop(correlation_id, None)

    def stream(self, body: dict[str, Any], *, timeout_s: float | None = None) -> ReplyStream:
        """Publish `body` with `"stream": true`; iterate the result for its chunks as they
        are generated, then read its `.reply`:

            stream = client.stream({"operation": "chat", "tenant_id": "acme", "messages": [...]})
            async for chunk in stream:
                print(chunk.delta, end="", flush=True)
            print(stream.reply.status)
        """
        correlation_id = str(uuid.uuid4())

        async def start(stream: ReplyStream) -> None:
            self._streams[correlation_id] = stream
            try:
                reply = await self.request(
                    {**body, "stream": True},
                    timeout_s=timeout_s,
                    correlation_id=correlation_id,
                    retries=0,  # chunks come to this correlation id only
                )
            except BaseException:
                stream._items.put_nowait(None)
                raise
            finally:
                self._streams.pop(correlation_id, None)
            stream._final(reply)

        return ReplyStream(start, timeout_s or self._timeout_s)

    async def cancel(
        self, request_id: str, *, tenant_id: str, timeout_s: float | None = None
    ) -> OperationReply:
        """Cancel the tenant's request `request_id` (queued: never runs; running: stops at the
        next step, answered `cancelled`). The reply's result says whether one was open."""
        body = {"operation": "cancel", "tenant_id": tenant_id, "request_id": request_id}
        return await self.request(body, timeout_s=timeout_s)

    async def summarize(
        self,
        *,
        tenant_id: str,
        text: str,
        max_sentences: int = 3,
        language: str = "en",
        **extra: Any,
    ) -> OperationReply:
        return await self.request(
            {"operation": "summarize", "tenant_id": tenant_id, "text": text,
             "max_sentences": max_sentences, "language": language, **extra}
        )  # fmt: skip

    async def translate(
        self, *, tenant_id: str, text: str, target_language: str,
        source_language: str = "auto", **extra: Any,
    ) -> OperationReply:  # fmt: skip
        return await self.request(
            {"operation": "translate", "tenant_id": tenant_id, "text": text,
             "source_language": source_language, "target_language": target_language, **extra}
        )  # fmt: skip

    async def classify(
        self, *, tenant_id: str, text: str, categories: list[str], **extra: Any
    ) -> OperationReply:
        return await self.request(
            {"operation": "classify", "tenant_id": tenant_id, "text": text,
             "categories": categories, **extra}
        )  # fmt: skip

    async def chat(
        self, *, tenant_id: str, messages: list[dict[str, str]], **extra: Any
    ) -> OperationReply:
        return await self.request(
            {"operation": "chat", "tenant_id": tenant_id, "messages": messages, **extra}
        )

    async def extract(
        self,
        *,
        tenant_id: str,
        text: str,
        schema: dict[str, Any],
        instructions: str | None = None,
        **extra: Any,
    ) -> OperationReply:
        """Fields from `text` as a JSON object valid against `schema` (a JSON Schema): on
        `ok`, `reply.result.data`; a schema the service cannot enforce is `validation`, an
        object that did not fit in `max_tokens` is `incomplete_output`."""
        body: dict[str, Any] = {
            "operation": "extract", "tenant_id": tenant_id, "text": text, "schema": schema,
        }  # fmt: skip
        if instructions is not None:
            body["instructions"] = instructions
        return await self.request({**body, **extra})

    async def _read_replies(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    self._deliver(record)

    def _deliver(self, record: Any) -> None:
        correlation_id = next(
            (
                v.decode("utf-8", "replace")
                for k, v in reversed(record.headers or ())
                if k == CORRELATION_ID
            ),
            None,
        )
        if any(k == CHUNK_SEQ for k, _ in record.headers or ()):
            stream = self._streams.get(correlation_id) if correlation_id else None
            if stream is not None:
                with contextlib.suppress(ValueError):
                    stream._chunk(StreamChunk.model_validate_json(record.value))
            return  # a chunk nobody streams (or a malformed one): dropped
        waiter = self._waiting.get(correlation_id) if correlation_id else None
        if waiter is None or waiter.done():
            return  # someone else's, late, or a duplicate: dropped
        try:
            waiter.set_result(OperationReply.model_validate_json(record.value))
        except ValueError as exc:
            waiter.set_exception(exc)

    async def run_batch(
        self,
        input_path: PathLike,
        out_path: PathLike,
        *,
        concurrency: int = 16,
        timeout_s: float | None = None,
        priority: str | None = "batch",
        batch_id: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> BatchSummary:
        """Send every line of a JSONL file of request bodies, `concurrency` at a time, and
        append one result line per reply to `out_path`; lines that already have a result
        there are skipped, so calling it again resumes (see `opstream_client.batch`). Lines without
        `priority` get `priority` (None: the service's default)."""

        async def send(body: dict[str, Any]) -> OperationReply:
            return await self.request(body, timeout_s=timeout_s)

        return await run_batch(
            input_path, out_path, send, concurrency=concurrency,
            priority=priority, batch_id=batch_id, on_progress=on_progress,
        )  # fmt: skip


def _dumps(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
