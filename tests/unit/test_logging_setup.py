"""Structured logs: event + fields as JSON, rotation, and text-bearing fields never written."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer.observability.logging import LoggingSettings, configure_logging

PROMPT = "Summarize: the merger closes on Friday"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_line_has_event_name_and_extra_fields(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "opstream.log"
    configure_logging(LoggingSettings(file=log_file))
    logging.getLogger("consumer.intake.flow").info(
        "request_answered", extra={"operation": "summarize", "queue_ms": 4.5, "partition": 3}
    )
    [line] = json_lines(log_file)
    assert line["event"] == "request_answered"
    assert line["level"] == "INFO"
    assert line["logger"] == "consumer.intake.flow"
    assert (line["operation"], line["queue_ms"], line["partition"]) == ("summarize", 4.5, 3)
    assert line["ts"].endswith("+00:00")


def test_text_bearing_fields_are_dropped_and_named(tmp_path: Path) -> None:
    log_file = tmp_path / "opstream.log"
    configure_logging(LoggingSettings(file=log_file))
    logging.getLogger("consumer").warning(
        "parse_failed",
        extra={"prompt": PROMPT, "messages": [{"content": PROMPT}], "secret": "s3", "code": "x"},
    )
    raw = log_file.read_text()
    assert PROMPT not in raw and "s3" not in raw
    [line] = json_lines(log_file)
    assert line["dropped_fields"] == ["messages", "prompt", "secret"]
    assert line["code"] == "x"


def test_console_format_is_event_then_key_value_pairs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LoggingSettings(format="console"))
    logging.getLogger("consumer").info(
        "model_loaded",
        extra={
            "backend": "llamacpp",
            "path": "/models/q 4.gguf",
            "partitions": [0, 1],
            "text": PROMPT,
        },
    )
    err = capsys.readouterr().err
    assert " INFO    consumer model_loaded backend=llamacpp " in err
    assert 'path="/models/q 4.gguf"' in err
    assert " partitions=[0,1] " in err
    assert "dropped_fields=text" in err
    assert PROMPT not in err


def test_exceptions_are_one_json_field(tmp_path: Path) -> None:
    log_file = tmp_path / "opstream.log"
    configure_logging(LoggingSettings(file=log_file))
    try:
        raise ValueError("bad offset")
    except ValueError:
        logging.getLogger("consumer").exception("commit_failed", extra={"partition": 1})
    [line] = json_lines(log_file)
    assert "ValueError: bad offset" in line["exception"]


def test_file_rotates_at_max_bytes_keeping_backups(tmp_path: Path) -> None:
    log_file = tmp_path / "opstream.log"
    configure_logging(LoggingSettings(file=log_file, max_bytes=1024, backups=2))
    for index in range(100):
        logging.getLogger("consumer").info("tick", extra={"index": index})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "opstream.log",
        "opstream.log.1",
        "opstream.log.2",
    ]
    assert log_file.stat().st_size <= 1024
    assert json_lines(log_file)[-1]["index"] == 99


def test_configuring_twice_replaces_handlers_and_applies_levels(tmp_path: Path) -> None:
    log_file = tmp_path / "opstream.log"
    configure_logging(LoggingSettings())
    configure_logging(LoggingSettings(level="WARNING", file=log_file))
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_opstream_handler", False)]
    assert len(ours) == 2  # stderr + file, not four
    logging.getLogger("consumer").info("hidden")
    logging.getLogger("consumer").warning("shown")
    assert [line["event"] for line in json_lines(log_file)] == ["shown"]
    assert logging.getLogger("aiokafka").level == logging.WARNING


def test_console_lines_have_no_escape_codes_or_color_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LoggingSettings(format="console"))
    # What uvicorn logs at startup: the plain message plus a coloured copy as an extra.
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        4242,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    logging.getLogger("consumer").info("tick", extra={"label": "\x1b[31mred\x1b[0m"})
    err = capsys.readouterr().err
    assert " INFO    uvicorn.error Started server process [4242]\n" in err
    assert " consumer tick label=red\n" in err
    assert "\x1b" not in err and "\\u001b" not in err
    assert "color_message" not in err


def test_json_lines_leave_out_color_message(tmp_path: Path) -> None:
    log_file = tmp_path / "opstream.log"
    configure_logging(LoggingSettings(file=log_file))
    logging.getLogger("uvicorn.error").info(
        "Finished server process", extra={"color_message": "\x1b[36mFinished\x1b[0m"}
    )
    [line] = json_lines(log_file)
    assert line["event"] == "Finished server process"
    assert "color_message" not in line


def test_faststream_app_and_library_lines_share_our_console_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consumer.app import build_app
    from consumer.settings import Settings

    settings = Settings(
        kafka={"bootstrap_servers": "127.0.0.1:9"},  # type: ignore[arg-type]
        usage={"enabled": False},  # type: ignore[arg-type]
        quota={"enabled": False},  # type: ignore[arg-type]
    )
    app = build_app(settings)
    configure_logging(LoggingSettings(format="console"))
    assert app.logger is not None
    # FastStream's Application logs "FastStream app starting..." through `app.logger`;
    # its default logger has its own coloured handler and does not propagate.
    app.logger.log(logging.INFO, "FastStream app starting...")
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("Heartbeat failed")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "INFO    consumer.bus.faststream FastStream app starting...",
        "WARNING aiokafka.consumer.group_coordinator Heartbeat failed",
    ]


def test_request_finished_line_has_the_numbers_and_no_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consumer.bus.records import InboundRecord
    from consumer.observability.console import log_request_finished
    from consumer.pipeline.outcome import Outcome, Stages

    record = InboundRecord(
        topic="ops.requests.v1",
        partition=0,
        offset=7,
        key=b"acme",
        value=json.dumps({"operation": "summarize", "text": PROMPT}).encode(),
        headers=(),
        timestamp_ms=1_000_000,
        received_at=1_000.0,
    )
    configure_logging(LoggingSettings(format="console"))
    log_request_finished(
        Outcome(
            record=record,
            status="ok",
            tenant_id="acme",
            operation="summarize",
            input_tokens=55,
            output_tokens=12,
            stages=Stages(bus_ms=4.0, total_ms=300.4),
            finished_at=1_000.3,
        )
    )
    log_request_finished(
        Outcome(
            record=record,
            status="error",
            error_code="quota_exceeded",
            tenant_id="acme",
            operation="chat",
            finished_at=1_000.0,
        )
    )
    log_request_finished(Outcome(record=record, status="forwarded", finished_at=1_000.0))
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "INFO    consumer.observability.console request_finished tenant=acme "
        "operation=summarize status=ok input_tokens=55 output_tokens=12 total_ms=300",
        "WARNING consumer.observability.console request_finished tenant=acme "
        "operation=chat status=error code=quota_exceeded input_tokens=0 output_tokens=0 total_ms=0",
    ]
    assert PROMPT not in "\n".join(lines)
