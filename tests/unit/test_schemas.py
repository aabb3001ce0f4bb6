"""The wire contract: request validation and bounds, and the reply's result-xor-error rule."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.replies import (
    ChatResult,
    ClassifyResult,
    ErrorInfo,
    Meta,
    OperationReply,
    SummarizeResult,
)
from schemas.requests import (
    MAX_CATEGORIES,
    MAX_CATEGORY_CHARS,
    ChatRequest,
    ClassifyRequest,
    SummarizeRequest,
    TranslateRequest,
    operation_request_adapter,
)


def parse(body: dict[str, Any]) -> Any:
    return operation_request_adapter.validate_python(body)


def error_locs(body: dict[str, Any]) -> set[tuple[str | int, ...]]:
    with pytest.raises(ValidationError) as caught:
        parse(body)
    return {tuple(e["loc"]) for e in caught.value.errors()}


def summarize(**extra: Any) -> dict[str, Any]:
    return {"operation": "summarize", "tenant_id": "t1", "text": "Some text.", **extra}


def translate(**extra: Any) -> dict[str, Any]:
    return {"operation": "translate", "tenant_id": "t1", "text": "Hallo.",
            "target_language": "en", **extra}  # fmt: skip


def classify(**extra: Any) -> dict[str, Any]:
    return {"operation": "classify", "tenant_id": "t1", "text": "Goal!",
            "categories": ["sports", "news"], **extra}  # fmt: skip


def chat(**extra: Any) -> dict[str, Any]:
    return {"operation": "chat", "tenant_id": "t1",
            "messages": [{"role": "user", "content": "Hi"}], **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (summarize(), SummarizeRequest),
        (translate(), TranslateRequest),
        (classify(), ClassifyRequest),
        (chat(), ChatRequest),
    ],
)
def test_operation_picks_its_request_model_with_defaults(body: dict[str, Any], model: type) -> None:
    request = parse(body)
    assert type(request) is model
    assert request.schema_version == 1
    assert request.request_id is None and request.deadline is None


def test_defaults_follow_the_original_platform() -> None:
    request = parse(summarize())
    assert (request.max_sentences, request.language) == (3, "en")
    assert parse(translate()).source_language == "auto"
    assert parse(chat()).temperature == 0.7


@pytest.mark.parametrize("make", [summarize, translate, classify, chat])
def test_unknown_fields_are_rejected(make: Any) -> None:
    body = make(surprise=True)
    assert (body["operation"], "surprise") in error_locs(body)


def test_unknown_field_inside_a_chat_message_is_rejected() -> None:
    body = chat(messages=[{"role": "user", "content": "Hi", "name": "x"}])
    assert ("chat", "messages", 0, "name") in error_locs(body)


def test_unknown_operation_is_rejected() -> None:
    with pytest.raises(ValidationError):
        parse({"operation": "poem", "tenant_id": "t1"})


@pytest.mark.parametrize(
    ("make", "limit"), [(summarize, 8000), (translate, 4000), (classify, 2000)]
)
def test_input_text_is_bounded_per_operation(make: Any, limit: int) -> None:
    assert parse(make(text="x" * limit)).text_chars() == limit
    body = make(text="x" * (limit + 1))
    assert (body["operation"], "text") in error_locs(body)


@pytest.mark.parametrize("make", [summarize, translate, classify])
def test_empty_text_is_rejected(make: Any) -> None:
    body = make(text="")
    assert (body["operation"], "text") in error_locs(body)


@pytest.mark.parametrize(("make", "limit"), [(summarize, 512), (translate, 512), (classify, 64)])
def test_max_tokens_is_bounded_per_operation(make: Any, limit: int) -> None:
    assert parse(make(max_tokens=limit)).max_tokens == limit
    with pytest.raises(ValidationError, match=f"<= {limit}"):
        parse(make(max_tokens=limit + 1))
    with pytest.raises(ValidationError):
        parse(make(max_tokens=0))


def test_categories_are_stripped_and_deduplicated_in_order() -> None:
    request = parse(classify(categories=["news", " sports", "news", "sports ", "weather"]))
    assert request.categories == ["news", "sports", "weather"]


@pytest.mark.parametrize(
    "categories",
    [
        ["only"],
        ["same", "same", " same "],
        ["ok", "   "],
        [],
        [f"c{i}" for i in range(MAX_CATEGORIES + 1)],
        ["ok", "x" * (MAX_CATEGORY_CHARS + 1)],
    ],
)
def test_categories_are_bounded(categories: list[str]) -> None:
    assert any(
        loc[:2] == ("classify", "categories") for loc in error_locs(classify(categories=categories))
    )


def test_the_most_categories_allowed_are_accepted() -> None:
    categories = [f"c{i}" for i in range(MAX_CATEGORIES)]
    assert len(parse(classify(categories=categories)).categories) == MAX_CATEGORIES


@pytest.mark.parametrize("tenant", ["", "has space", "x" * 129, "semi;colon"])
def test_tenant_id_is_a_safe_bounded_name(tenant: str) -> None:
    assert ("summarize", "tenant_id") in error_locs(summarize(tenant_id=tenant))


@pytest.mark.parametrize("code", ["english", "e", "en US", ""])
def test_language_codes_are_checked(code: str) -> None:
    assert ("translate", "target_language") in error_locs(translate(target_language=code))


def test_regional_language_codes_and_auto_are_accepted() -> None:
    request = parse(translate(source_language="auto", target_language="pt-BR"))
    assert request.target_language == "pt-BR"


def test_deadline_needs_a_zone() -> None:
    assert parse(summarize(deadline="2030-01-01T00:00:00Z")).deadline.tzinfo is not None
    assert ("summarize", "deadline") in error_locs(summarize(deadline="2030-01-01T00:00:00"))


def test_summarize_max_sentences_is_bounded() -> None:
    assert ("summarize", "max_sentences") in error_locs(summarize(max_sentences=0))
    assert ("summarize", "max_sentences") in error_locs(summarize(max_sentences=21))


def test_chat_must_end_with_a_user_turn() -> None:
    with pytest.raises(ValidationError, match="last message"):
        parse(chat(messages=[{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]))  # fmt: skip


def test_chat_stop_accepts_a_string_and_is_bounded() -> None:
    assert parse(chat(stop="END")).stop == ["END"]
    assert ("chat", "stop") in error_locs(chat(stop=["a", "b", "c", "d", "e"]))


def test_chat_sampling_parameters_are_bounded() -> None:
    assert ("chat", "temperature") in error_locs(chat(temperature=2.5))
    assert ("chat", "top_p") in error_locs(chat(top_p=0))


# ── replies ──


def meta() -> Meta:
    return Meta(operation="summarize", timestamp=datetime.now(UTC))


def error() -> ErrorInfo:
    return ErrorInfo(code="validation", message="bad", retryable=False, http_status=422)


def test_ok_reply_carries_a_result() -> None:
    reply = OperationReply(
        status="ok", result=SummarizeResult(summary="s", sentence_count=1), meta=meta()
    )
    assert reply.error is None


def test_error_reply_carries_an_error() -> None:
    assert OperationReply(status="error", error=error(), meta=meta()).result is None


@pytest.mark.parametrize(
    ("status", "with_result", "with_error"),
    [("ok", False, False), ("ok", True, True), ("ok", False, True),
     ("error", False, False), ("error", True, True), ("error", True, False)],
)  # fmt: skip
def test_reply_has_a_result_xor_an_error(status: str, with_result: bool, with_error: bool) -> None:
    with pytest.raises(ValidationError, match="status"):
        OperationReply(
            status=status,  # type: ignore[arg-type]
            result=SummarizeResult(summary="s", sentence_count=1) if with_result else None,
            error=error() if with_error else None,
            meta=meta(),
        )


def test_reply_round_trips_through_json_keeping_the_result_type() -> None:
    for result in (
        ClassifyResult(label="a", confidence=0.6, scores={"a": 0.6, "b": 0.4}),
        ChatResult(message={"content": "hi"}, finish_reason="length"),  # type: ignore[arg-type]
    ):
        reply = OperationReply(status="ok", result=result, meta=meta())
        again = OperationReply.model_validate_json(reply.model_dump_json(exclude_none=True))
        assert type(again.result) is type(result)
        assert again == reply


def test_unknown_error_codes_and_reply_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        ErrorInfo(code="teapot", message="x", retryable=False, http_status=418)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        OperationReply.model_validate(
            {"status": "error", "error": error().model_dump(), "meta": meta().model_dump(),
             "extra": 1}
        )  # fmt: skip
