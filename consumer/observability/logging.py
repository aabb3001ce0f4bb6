"""Structured logs: one event name plus key=value fields, as JSON lines or for a console.

Log like `logger.info("request_answered", extra={"operation": "summarize", "queue_ms": 4})`.
The message is the event name; everything passed in `extra=` becomes a field. Fields that
usually carry request or secret text (`text`, `prompt`, `messages`, `secret`, …) are dropped
by `TextFieldFilter` before any handler formats them, and the record says which were dropped.

Every opstream logger is named for its module, under `consumer.` (`getLogger(__name__)`);
FastStream's own lines use `FASTSTREAM_LOGGER`, under `consumer.bus`. So one level override
(`logging.levels`) of a prefix, e.g. `consumer.engine`, reaches everything below it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from datetime import UTC, datetime
from typing import Any

from consumer.settings.observability import LoggingSettings

# Names a caller might use for prompt/completion text or credentials. Dropped, not masked:
# a masked prompt still leaks its length and shape.
TEXT_BEARING_FIELDS = frozenset(
    {
        "text",
        "prompt",
        "prompts",
        "completion",
        "completions",
        "messages",
        "content",
        "body",
        "payload",
        "raw",
        "summary",
        "translated_text",
        "system_prompt",
        "secret",
        "password",
        "signature",
        "sasl_password",
        "ssl_password",
    }
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "dropped_fields"}
)
# Not fields either: uvicorn's `color_message` repeats the message with ANSI colour codes.
_NOT_FIELDS = _RECORD_ATTRIBUTES | {"color_message"}
_HANDLER_MARK = "_opstream_handler"
# FastStream's app and per-message lines (its own logger would colour them and not propagate).
FASTSTREAM_LOGGER = "consumer.bus.faststream"
# CSI sequences (colours, cursor moves), then any escape character left over.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b")


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The key=value fields a record carries (what was passed in `extra=`)."""
    return {k: v for k, v in vars(record).items() if k not in _NOT_FIELDS}


class TextFieldFilter(logging.Filter):
    """Removes fields that may hold request text or secrets; never drops the record itself."""

    def __init__(self, fields: frozenset[str] = TEXT_BEARING_FIELDS) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        dropped = sorted(name for name in self.fields if name in record.__dict__)
        for name in dropped:
            del record.__dict__[name]
        if dropped:
            record.dropped_fields = dropped
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, the fields, then any exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in event_fields(record).items():
            document.setdefault(key, value)
        dropped = getattr(record, "dropped_fields", None)
        if dropped:
            document["dropped_fields"] = dropped
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """`ts LEVEL logger event key=value …` for a human at a terminal, without escape codes."""

    def format(self, record: logging.LogRecord) -> str:
        fields = event_fields(record)
        dropped = getattr(record, "dropped_fields", None)
        if dropped:
            fields["dropped_fields"] = ",".join(dropped)
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name, record.getMessage()]
        parts += [f"{key}={_console_value(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        # A library's colours (or a hostile value) must not repaint the operator's terminal.
        return _ESCAPES.sub("", line)


def configure_logging(settings: LoggingSettings) -> list[logging.Handler]:
    """Install opstream's handlers on the root logger (replacing ones installed before)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()

    console: logging.Handler = logging.StreamHandler(sys.stderr)
    console.setFormatter(JsonFormatter() if settings.format == "json" else ConsoleFormatter())
    handlers = [console]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            settings.file,
            maxBytes=settings.max_bytes,
            backupCount=settings.backups,
            encoding="utf-8",
        )
        # Files are for machines: always JSON, whatever the console shows.
        rotating.setFormatter(JsonFormatter())
        handlers.append(rotating)

    for handler in handlers:
        handler.addFilter(TextFieldFilter())
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(settings.level)
    for name, level in settings.levels.items():
        logging.getLogger(name).setLevel(level)
    return handlers


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _console_value(value: Any) -> str:
    text = (
        value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    )
    return json.dumps(text) if (" " in text or not text) else text
