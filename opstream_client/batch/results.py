"""The output of a batch: the results already there, and appending new ones."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FSYNC_INTERVAL_S = 1.0


@dataclass
class Existing:
    """What an output file already holds."""

    codes: dict[str, str] = field(default_factory=dict)  # request_id -> "ok" or error code
    unreadable: int = 0  # complete lines that are not a result (left in place)
    truncated_bytes: int = 0  # a partial last line (a killed run's write)


def result_code(record: dict[str, Any]) -> str:
    """ "ok", or the error code of an error result."""
    if record.get("status") == "ok":
        return "ok"
    error = record.get("error")
    return str(error.get("code", "error")) if isinstance(error, dict) else "error"


def read_results(path: Path) -> Existing:
    """The results in `path` (none when it does not exist). A last line without its
    newline is a write that a kill interrupted: `partial_line` says how long it is."""
    found = Existing()
    if not path.exists():
        return found
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    found.truncated_bytes = len(data) - end
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            request_id = record["request_id"]
        except (ValueError, TypeError, KeyError):
            found.unreadable += 1
            continue
        if isinstance(request_id, str):
            found.codes[request_id] = result_code(record)
        else:
            found.unreadable += 1
    return found


def repair_last_line(path: Path) -> int:
    """Make `path` end with a newline, so the next append starts a line of its own: a
    partial last line is cut off (returns its length in bytes); one that is a whole result
    and only lacks its newline gets it (returns 0)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return 0
    try:
        whole = isinstance(json.loads(data[end:]).get("request_id"), str)
    except (ValueError, AttributeError):
        whole = False
    with path.open("r+b") as f:
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return 0 if whole else len(data) - end


class ResultWriter:
    """Appends result lines: each one written through to the OS at once (a killed process
    loses none), fsynced at most every `fsync_interval_s` and on close (a power cut loses at
    most that much)."""

    def __init__(self, path: Path, fsync_interval_s: float = FSYNC_INTERVAL_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._interval = fsync_interval_s
        self._synced = time.monotonic()
        self._dirty = False

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        self._dirty = True
        if time.monotonic() - self._synced >= self._interval:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._file.fileno())
            self._dirty = False
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
