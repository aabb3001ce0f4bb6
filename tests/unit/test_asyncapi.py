"""The published contract: the committed AsyncAPI document is current, and `opstream schema`
writes a JSON Schema per message that real messages validate against."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from consumer.app import asyncapi_document
from consumer.cli.main import main
from consumer.settings import Settings
from schemas.export import ASYNCAPI_FILE, MESSAGES, render
from schemas.replies import ClassifyResult, Meta, OperationReply

REGENERATE = (
    'python -c "from consumer.app import asyncapi_document; '
    "from consumer.settings import Settings; "
    "from schemas.export import render, ASYNCAPI_FILE; "
    'ASYNCAPI_FILE.write_text(render(asyncapi_document(Settings())))"'
)

SAMPLES: dict[str, dict[str, Any]] = {
    "summarize-request": {"operation": "summarize", "tenant_id": "t1", "text": "A. B. C.",
                          "max_sentences": 2, "request_id": "r-1",
                          "deadline": "2030-01-01T00:00:00Z"},
    "translate-request": {"operation": "translate", "tenant_id": "t1", "text": "Hallo",
                          "source_language": "de", "target_language": "en"},
    "classify-request": {"operation": "classify", "tenant_id": "t1", "text": "Goal!",
                         "categories": ["sports", "news"]},
    "chat-request": {"operation": "chat", "tenant_id": "t1", "max_tokens": 20,
                     "messages": [{"role": "user", "content": "Hi"}], "stop": ["END"]},
}  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed document describes the defaults, not this machine's OPSTREAM_* variables."""
    for name in list(os.environ):
        if name.upper().startswith("OPSTREAM_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_committed_asyncapi_document_is_current() -> None:
    current = render(asyncapi_document(Settings()))
    assert current == ASYNCAPI_FILE.read_text(encoding="utf-8"), (
        f"{ASYNCAPI_FILE} is out of date with the code; regenerate it with:\n  {REGENERATE}"
    )


@pytest.mark.usefixtures("clean_env")
def test_asyncapi_document_describes_the_request_reply_and_dead_letter_topics() -> None:
    document = asyncapi_document(Settings())
    addresses = {channel.get("address") for channel in document["channels"].values()}
    assert {"ops.requests.v1", "ops.replies.v1", "ops.requests.dlq.v1"} <= addresses


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas")
    assert main(["schema", "--out", str(out)]) == 0
    return out


def load(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.schema.json").read_text(encoding="utf-8"))


def test_schema_command_writes_a_valid_json_schema_per_message(written: Path) -> None:
    for name in MESSAGES:
        schema = load(written, name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)
    assert json.loads((written / "asyncapi.json").read_text(encoding="utf-8"))["asyncapi"]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_requests_validate_against_their_schemas(written: Path, name: str) -> None:
    sample = SAMPLES[name]
    jsonschema.validate(sample, load(written, name))
    jsonschema.validate(sample, load(written, "operation-request"))


@pytest.mark.parametrize("name", list(SAMPLES))
def test_request_schemas_reject_unknown_fields(written: Path, name: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**SAMPLES[name], "unexpected": 1}, load(written, name))


def test_operation_request_schema_rejects_an_unknown_operation(written: Path) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**SAMPLES["chat-request"], "operation": "poem"}, load(written, "operation-request")
        )


def test_a_real_reply_validates_against_the_reply_schema(written: Path) -> None:
    reply = OperationReply(
        status="ok",
        result=ClassifyResult(label="a", confidence=0.7, scores={"a": 0.7, "b": 0.3}),
        meta=Meta(operation="classify", model_used="m", timestamp=datetime.now(UTC)),
    )
    body = json.loads(reply.model_dump_json(exclude_none=True))
    jsonschema.validate(body, load(written, "operation-reply"))
