"""Where usage segments live on disk: partition folders, part names and the reader glob."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Readers (the catalog views) glob exactly this below the root. Temp files start
# with a dot and end in `.tmp`, so a reader can never list a file still being written.
PART_GLOB = "date=*/hour=*/instance=*/part-*.parquet"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
COMPACTED_MARK = "-compacted-"
# A zero-row segment that pins the column types so the views bind before any row exists.
SCHEMA_INSTANCE = "_schema"
SCHEMA_HOUR = datetime(1970, 1, 1, tzinfo=UTC)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_HOUR_DIR = re.compile(r"^hour=(\d{2})$")


def safe_instance(instance_id: str) -> str:
    """The instance id as a folder name: no separators, no `=`, never hidden."""
    cleaned = _UNSAFE.sub("_", instance_id).lstrip(".")
    return cleaned or "_"


def hour_start(ts: datetime) -> datetime:
    """The UTC hour a timestamp falls in."""
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_of_epoch(epoch_hour: int) -> datetime:
    """The UTC hour numbered `epoch_hour` hours since 1970."""
    return datetime.fromtimestamp(epoch_hour * 3600, tz=UTC)


def partition_dir(root: Path, hour: datetime, instance_id: str) -> Path:
    """`root/date=YYYY-MM-DD/hour=HH/instance=ID` for a UTC hour."""
    hour = hour_start(hour)
    return (
        root
        / f"date={hour:%Y-%m-%d}"
        / f"hour={hour:%H}"
        / f"instance={safe_instance(instance_id)}"
    )


def parse_partition_hour(date_dir: str, hour_dir: str) -> datetime | None:
    """The UTC hour named by a `date=`/`hour=` pair of folder names, or None if not one."""
    date_match = _DATE_DIR.match(date_dir)
    hour_match = _HOUR_DIR.match(hour_dir)
    if not (date_match and hour_match):
        return None
    try:
        day = datetime.strptime(date_match.group(1), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    hour = int(hour_match.group(1))
    if hour > 23:
        return None
    return day + timedelta(hours=hour)


def part_name(created_ns: int, token: str, *, compacted: bool = False) -> str:
    """A segment's visible name; sorts by creation time within a folder."""
    mark = COMPACTED_MARK if compacted else "-"
    return f"{PART_PREFIX}{created_ns:020d}{mark}{token}{PART_SUFFIX}"


def temp_name(final_name: str) -> str:
    """The hidden name a segment is written under before it is renamed into view."""
    return f".{final_name}{TEMP_SUFFIX}"


def is_visible_part(name: str) -> bool:
    """True for a name the readers' glob matches."""
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


def is_compacted_part(name: str) -> bool:
    """True for a segment produced by compaction."""
    return is_visible_part(name) and COMPACTED_MARK in name


def is_hour_closed(hour: datetime, now: datetime, after_s: float) -> bool:
    """An hour is closed once it ended `after_s` ago: no writer should still add to it."""
    return now >= hour_start(hour) + timedelta(hours=1, seconds=after_s)


def sql_string(value: str | Path) -> str:
    """A SQL string literal (DuckDB has no parameters in COPY targets or view bodies)."""
    return "'" + str(value).replace("'", "''") + "'"
