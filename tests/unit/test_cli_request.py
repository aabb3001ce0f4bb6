"""`opstream request <operation>`: the request body built from the command line is one the
contract accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.cli.main import build_parser, main
from consumer.cli.request import request_body
from schemas.requests import operation_request_adapter


def body_of(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["request", *argv])
    body = request_body(args)
    operation_request_adapter.validate_python(body)  # every body built is a valid request
    return body


def test_summarize_body() -> None:
    body = body_of("summarize", "--tenant", "acme", "--text", "One. Two.", "--max-sentences", "1",
                   "--max-tokens", "50", "--request-id", "r-1")  # fmt: skip
    assert body == {"operation": "summarize", "tenant_id": "acme", "text": "One. Two.",
                    "max_sentences": 1, "max_tokens": 50, "request_id": "r-1"}  # fmt: skip


def test_summarize_body_leaves_defaults_to_the_service() -> None:
    assert body_of("summarize", "--tenant", "acme", "--text", "x") == {
        "operation": "summarize", "tenant_id": "acme", "text": "x",
    }  # fmt: skip


def test_translate_body() -> None:
    body = body_of("translate", "--tenant", "acme", "--text", "Hallo", "--target-language", "en",
                   "--source-language", "de")  # fmt: skip
    assert body == {"operation": "translate", "tenant_id": "acme", "text": "Hallo",
                    "target_language": "en", "source_language": "de"}  # fmt: skip


def test_translate_without_source_language_auto_detects() -> None:
    body = body_of("translate", "--tenant", "acme", "--text", "Hallo", "--target-language", "en")
    assert "source_language" not in body


def test_classify_body_collects_repeated_categories_in_order() -> None:
    body = body_of("classify", "--tenant", "acme", "--text", "Goal!", "--category", "sports",
                   "--category", "finance", "--category", "weather")  # fmt: skip
    assert body == {"operation": "classify", "tenant_id": "acme", "text": "Goal!",
                    "categories": ["sports", "finance", "weather"]}  # fmt: skip


def test_chat_body_from_text_is_one_user_message() -> None:
    body = body_of("chat", "--tenant", "acme", "--text", "Hi there", "--max-tokens", "20")
    assert body == {"operation": "chat", "tenant_id": "acme", "max_tokens": 20,
                    "messages": [{"role": "user", "content": "Hi there"}]}  # fmt: skip


def test_chat_body_keeps_messages_in_order_and_colons_in_content() -> None:
    body = body_of(
        "chat", "--tenant", "acme", "--message", "system:Be brief: very.",
        "--message", "user:Hi", "--message", "assistant:Hello", "--text", "Time?",
    )  # fmt: skip
    assert body["messages"] == [
        {"role": "system", "content": "Be brief: very."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Time?"},
    ]


def test_chat_message_without_a_role_is_refused() -> None:
    args = build_parser().parse_args(["request", "chat", "--tenant", "a", "--message", "no role"])
    with pytest.raises(ValueError, match="role:content"):
        request_body(args)


@pytest.mark.parametrize("operation", ["summarize", "classify"])
def test_text_operations_need_text(operation: str) -> None:
    argv = ["request", operation, "--tenant", "acme"]
    if operation == "classify":
        argv += ["--category", "a", "--category", "b"]
    with pytest.raises(ValueError, match="needs --text"):
        request_body(build_parser().parse_args(argv))


def test_required_options_are_enforced_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["request", "translate", "--tenant", "a", "--text", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["request", "classify", "--tenant", "a", "--text", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["request", "summarize", "--text", "x"])


def test_request_without_bootstrap_servers_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPSTREAM_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    assert main(["request", "summarize", "--tenant", "a", "--text", "x"]) == 2
    assert "--bootstrap-servers" in capsys.readouterr().err


def test_request_with_a_bad_body_exits_2_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Port 1 on loopback: nothing listens, so reaching the network would fail differently.
    code = main(["request", "summarize", "--tenant", "a", "--bootstrap-servers", "127.0.0.1:1"])
    assert code == 2
    assert "needs --text" in capsys.readouterr().err


def test_half_a_signing_key_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["request", "summarize", "--tenant", "a", "--text", "x", "--key-id", "k1",
                 "--bootstrap-servers", "127.0.0.1:1"])  # fmt: skip
    assert code == 2
    assert "--secret" in capsys.readouterr().err


def test_cancel_body_is_a_valid_cancel_request() -> None:
    from schemas.requests import CancelRequest

    args = build_parser().parse_args(
        ["request", "cancel", "--tenant", "acme", "--request-id", "r-9"]
    )
    body = request_body(args)
    assert CancelRequest.model_validate(body).request_id == "r-9"
    assert body == {"operation": "cancel", "tenant_id": "acme", "request_id": "r-9"}


def test_priority_goes_into_the_body_and_stream_is_a_flag() -> None:
    body = body_of("chat", "--tenant", "acme", "--text", "hi", "--priority", "batch")
    assert body["priority"] == "batch"
    args = build_parser().parse_args(
        ["request", "chat", "--tenant", "a", "--text", "x", "--stream"]
    )
    assert args.stream is True
    with pytest.raises(SystemExit):  # classification has nothing to stream
        build_parser().parse_args(["request", "classify", "--tenant", "a", "--stream"])


def test_a_closed_pipe_ends_the_command_quietly(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import os

    import consumer.cli.schema as schema

    def reader_went_away(args: Any, settings: Any) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(schema, "cmd_schema", reader_went_away)
    saved = os.dup(1)
    try:
        assert main(["schema", "--out", "/nonexistent"]) == 141
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert "Traceback" not in capfd.readouterr().err


INVOICE = {
    "type": "object",
    "properties": {"number": {"type": "string"}, "total": {"type": "number", "minimum": 0}},
    "required": ["number", "total"],
}


def test_extract_body_reads_the_schema_file(tmp_path: Any) -> None:
    schema = tmp_path / "invoice.json"
    schema.write_text(json.dumps(INVOICE))
    body = body_of("extract", "--tenant", "acme", "--text", "Invoice 7, total 12.50 EUR",
                   "--schema", str(schema), "--instructions", "the invoice")  # fmt: skip
    assert body == {"operation": "extract", "tenant_id": "acme",
                    "text": "Invoice 7, total 12.50 EUR", "schema": INVOICE,
                    "instructions": "the invoice"}  # fmt: skip


def test_extract_with_a_schema_file_that_is_not_json_exits_2(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "broken.json"
    schema.write_text("{not json")
    code = main(["request", "extract", "--bootstrap-servers", "127.0.0.1:1", "--tenant", "a",
                 "--text", "x", "--schema", str(schema)])  # fmt: skip
    assert code == 2
    assert "is not JSON" in capsys.readouterr().err


def test_chat_response_formats() -> None:
    body = body_of("chat", "--tenant", "acme", "--text", "List two colours", "--json")
    assert body["response_format"] == {"type": "json_object"}


def test_chat_with_a_schema(tmp_path: Any) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(INVOICE))
    body = body_of("chat", "--tenant", "acme", "--text", "Make one up", "--schema", str(schema))
    assert body["response_format"] == {"type": "json_schema", "schema": INVOICE}
