"""How FastStream turns a fetched record into a message: headers read leniently, body untouched."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from faststream.kafka import KafkaMessage

from consumer.bus.records import is_utf8


async def lenient_headers(record: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's parser, tolerant of header values that are not UTF-8 (or are null).

    FastStream decodes every header value as strict UTF-8 for its own use; a record with
    any other header never reached the handler, so its offset was committed past with no
    reply, dead letter or usage row. It parses a lenient copy here; the handler still gets
    the original record (the pipeline reads the raw header bytes itself).
    """
    headers = record.headers or ()
    if all(isinstance(value, bytes) and is_utf8(value) for _, value in headers):
        return await original(record)
    lenient = tuple(
        (key, (value or b"").decode("utf-8", "replace").encode()) for key, value in headers
    )
    message = await original(dataclasses.replace(record, headers=lenient))
    message.raw_message = record
    return message


async def raw_record(message: KafkaMessage) -> Any:
    """The subscriber's decoder: hand the pipeline the record itself (it decodes the body)."""
    return message.raw_message
