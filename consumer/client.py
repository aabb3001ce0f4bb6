"""The producer's side: `OperationsClient` publishes requests and awaits their replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry import trace

from consumer.auth.signature import Routing, sign
from consumer.bus.records import CONTENT_TYPE, CORRELATION_ID, JSON, REPLY_TO
from consumer.observability.telemetry import inject_context
from schemas.replies import OperationReply

Signer = Callable[[bytes, str, Routing], list[tuple[str, bytes]]]
"""(body, tenant_id, (correlation bytes, reply topic, reply partition)) -> headers."""


def _hmac_signer(key_id: str, secret: str) -> Signer:
    def signer(body: bytes, tenant_id: str, routing: Routing) -> list[tuple[str, bytes]]:
        return sign(body, tenant_id, key_id, secret, time.time(), routing)

    return signer


log = logging.getLogger(__name__)


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
        tracer: trace.Tracer | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        """`key_id` + `secret` sign every request (HMAC-SHA256, see the README); a custom
        `signer(body, tenant_id, routing) -> headers` may replace them (scheme v2 signs
        the routing: correlation id bytes, reply topic, reply partition). Trace context of the
        current span is injected into each request's headers."""
        if (key_id is None) != (secret is None):
            raise ValueError("give both key_id and secret, or neither")
        if signer is None and key_id is not None and secret is not None:
            signer = _hmac_signer(key_id, secret)
        self._bootstrap = bootstrap_servers
        self._request_topic = request_topic
        self.reply_topic = reply_topic
        self._timeout_s = timeout_s
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._signer = signer
        self._tracer = tracer or trace.get_tracer("opstream.client")
        self._options = client_options or {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._waiting: dict[str, asyncio.Future[OperationReply]] = {}
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
        partitions = self._consumer.partitions_for_topic(self.reply_topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.reply_topic) or set()
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
    ) -> OperationReply:
        """Publish one request body (keyed by tenant) and wait for its reply."""
        if self._producer is None:
            raise RuntimeError("client not started")
        correlation_id = correlation_id or str(uuid.uuid4())
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
            with self._tracer.start_as_current_span(
                f"send {self._request_topic}",
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": self._request_topic,
                    "opstream.operation": str(body.get("operation")),
                },
            ) as span:
                inject_context(headers)
                await self._producer.send_and_wait(
                    self._request_topic,
                    payload,
                    key=str(body["tenant_id"]).encode(),
                    headers=headers,
                )
                reply = await asyncio.wait_for(waiter, timeout_s or self._timeout_s)
                span.set_attribute("opstream.status", reply.status)
                return reply
        finally:
            self._waiting.pop(correlation_id, None)

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
        waiter = self._waiting.get(correlation_id) if correlation_id else None
        if waiter is None or waiter.done():
            return  # someone else's, late, or a duplicate: dropped
        try:
            waiter.set_result(OperationReply.model_validate_json(record.value))
        except ValueError as exc:
            waiter.set_exception(exc)


def _dumps(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
