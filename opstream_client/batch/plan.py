"""The plan of a batch: which input lines to send, under which request ids."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

BATCH_ID = re.compile(r"^[\x21-\x7e]{1,100}$")  # request ids are printable ASCII, <= 128


class BatchError(Exception):
    """The batch cannot start (unreadable input, an output that belongs to another input)."""


@dataclass(frozen=True)
class Line:
    """One request line of the input: where it is, its request id, and why it is no
    request (`problem`, then it becomes an `invalid_line` result without being sent)."""

    number: int
    offset: int
    request_id: str
    problem: str | None = None


def batch_id_of(path: Path) -> str:
    """`batch-` and the first 16 hex digits of the SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "batch-" + digest.hexdigest()[:16]


def _numbered_lines(f: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, raw line without its end) of a binary file."""
    offset = 0
    for number, raw in enumerate(f, start=1):
        yield number, offset, raw.rstrip(b"\r\n")
        offset += len(raw)


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the request body, None) or (None, why the line is not a request). Only what the
    batch needs is checked here; the service validates the rest (its reply is the result)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(body, dict):
        return None, f"not a JSON object (a {type(body).__name__})"
    for name in ("tenant_id", "operation"):
        if not isinstance(body.get(name), str) or not body[name]:
            return None, f"no {name} (a non-empty string is required)"
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        return None, "request_id must be a non-empty string"
    return body, None


def plan_lines(path: Path, batch_id: str) -> list[Line]:
    """Every request line of `path` (blank lines are skipped) with its request id."""
    lines: list[Line] = []
    first: dict[str, int] = {}
    with path.open("rb") as f:
        for number, offset, raw in _numbered_lines(f):
            if not raw.strip():
                continue
            body, problem = parse_line(raw)
            derived = f"{batch_id}-{number}"
            request_id = (body or {}).get("request_id") or derived
            if request_id in first:
                problem = f"request_id {request_id!r} is also used by line {first[request_id]}"
                request_id = derived if derived not in first else f"{derived}-dup"
            first.setdefault(request_id, number)
            lines.append(Line(number, offset, request_id, problem))
    return lines
