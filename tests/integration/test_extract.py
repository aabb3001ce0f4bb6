"""extract and chat's response_format through Kafka on the real model (SmolLM2-135M on
llama.cpp): every `ok` reply of the schema corpus validates against its schema (jsonschema,
independent of the grammar engine), the only other outcome is `incomplete_output`; streamed
chunks are the JSON text; refused schemas and cut outputs get their error codes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jsonschema
import pytest
import pytest_asyncio

from opstream_client import OperationsClient
from schemas.replies import ChatResult, ExtractResult, OperationReply
from tests.support.extract_corpus import SCHEMAS, TEXTS
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    base_settings,
    merge,
    new_topics,
    serving,
)

pytestmark = pytest.mark.integration

MAX_TOKENS = 128  # a corpus object is 10-70 tokens; a looping string ends at this


@dataclass
class Live:
    consumer: ConsumerProcess
    client: OperationsClient


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("extract")
    topics = await new_topics(broker)
    settings = merge(
        base_settings(broker, topics, tmp),
        {"engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 1536, "slots": 8}}},
    )
    async with serving(broker, topics, settings, tmp / "consumer.log", client_timeout_s=240.0) as (
        consumer,
        client,
    ):
        yield Live(consumer, client)


async def test_every_ok_reply_of_the_corpus_validates_against_its_schema(live: Live) -> None:
    # One text per schema keeps this under ~2 minutes on 2 shared cores; the benchmark
    # (tests/bench/bench_structured.py) runs every text, against unconstrained chat too.
    cases = [(name, TEXTS[name][0]) for name in SCHEMAS]
    replies: list[OperationReply] = await asyncio.gather(
        *(
            live.client.request(
                {"operation": "extract", "tenant_id": "extract-corpus", "text": text,
                 "schema": SCHEMAS[name], "max_tokens": MAX_TOKENS},
                retries=0,
            )
            for name, text in cases
        )
    )  # fmt: skip
    ok = 0
    for (name, _), reply in zip(cases, replies, strict=True):
        if reply.status == "ok":
            assert isinstance(reply.result, ExtractResult)
            jsonschema.validate(reply.result.data, SCHEMAS[name])
            assert reply.meta.operation == "extract" and reply.meta.output_tokens > 0
            ok += 1
        else:
            assert reply.error is not None and reply.error.code == "incomplete_output", reply
            assert reply.meta.output_tokens == MAX_TOKENS  # what ran is counted
    print(f"extract corpus: {ok}/{len(cases)} ok, all valid; the rest incomplete_output")
    assert ok >= len(cases) * 2 // 3, f"only {ok} of {len(cases)} completed"


async def test_streamed_chunks_are_the_json_text_and_the_reply_carries_the_object(
    live: Live,
) -> None:
    body = {"operation": "extract", "tenant_id": "extract-stream", "max_tokens": MAX_TOKENS,
            "text": TEXTS["person"][0], "schema": SCHEMAS["person"]}  # fmt: skip
    stream = live.client.stream(body)
    chunks = [chunk async for chunk in stream]
    reply = stream.reply
    assert reply is not None and reply.status == "ok", reply
    assert isinstance(reply.result, ExtractResult)
    assert json.loads("".join(c.delta for c in chunks)) == reply.result.data
    jsonschema.validate(reply.result.data, SCHEMAS["person"])


async def test_sampled_chat_with_a_json_schema_response_format_is_valid_json(live: Live) -> None:
    schema = SCHEMAS["tags"]
    replies = await asyncio.gather(
        *(
            live.client.request(
                {
                    "operation": "chat",
                    "tenant_id": "extract-chat",
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0.9,
                    "messages": [{"role": "user", "content": f"Tags for: {TEXTS['tags'][0]}"}],
                    "response_format": {"type": "json_schema", "schema": schema},
                }
            )
            for _ in range(2)
        ),
        live.client.request(
            {
                "operation": "chat",
                "tenant_id": "extract-chat",
                "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
                "response_format": {"type": "json_object"},
            }
        ),
    )
    for reply in replies[:2]:
        if reply.status == "ok":
            assert isinstance(reply.result, ChatResult)
            jsonschema.validate(json.loads(reply.result.message.content), schema)
        else:
            assert reply.error is not None and reply.error.code == "incomplete_output"
    last = replies[2]
    if last.status == "ok":
        assert isinstance(last.result, ChatResult)
        assert isinstance(json.loads(last.result.message.content), dict)
    else:
        assert last.error is not None and last.error.code == "incomplete_output"


async def test_an_unsupported_or_uncompilable_schema_is_validation_naming_where(
    live: Live,
) -> None:
    unsupported = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    reply = await live.client.extract(tenant_id="extract-bad", text="x", schema=unsupported)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "validation" and reply.error.errors
    assert "/properties/ids/uniqueItems" in reply.error.errors[0].msg
    broken = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}
    reply = await live.client.extract(tenant_id="extract-bad", text="x", schema=broken)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "validation" and reply.error.errors
    assert reply.error.errors[0].loc == ["schema"] and reply.meta.output_tokens == 0


async def test_an_object_cut_by_max_tokens_is_incomplete_output_and_its_tokens_count(
    live: Live,
) -> None:
    reply = await live.client.extract(
        tenant_id="extract-cut", text=TEXTS["order"][0], schema=SCHEMAS["order"], max_tokens=4
    )
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "incomplete_output" and reply.error.http_status == 422
    assert "max_tokens (4)" in reply.error.message
    assert reply.meta.output_tokens == 4 and reply.meta.input_tokens > 0


async def test_a_running_extract_is_cancelled_and_charged_what_it_generated(live: Live) -> None:
    # At least 40 strings: far more than it gets to before the cancel.
    long = {"type": "object", "required": ["notes"],
            "properties": {"notes": {"type": "array", "items": {"type": "string"},
                                     "minItems": 40}}}  # fmt: skip
    body = {"operation": "extract", "tenant_id": "extract-cancel", "request_id": "long-1",
            "text": TEXTS["review"][0], "schema": long, "max_tokens": 1000}  # fmt: skip
    stream = live.client.stream(body)
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 1:
            cancel = await live.client.cancel("long-1", tenant_id="extract-cancel")
            assert cancel.status == "ok"
    reply = stream.reply
    assert reply is not None and reply.error is not None and reply.error.code == "cancelled"
    assert 0 < reply.meta.output_tokens < 1000
