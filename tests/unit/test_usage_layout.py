"""Where segments go and which names a reader's glob can see."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from consumer.usage import layout


def test_partition_dir_is_utc_date_hour_and_instance() -> None:
    local = datetime(2025, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=3)))
    path = layout.partition_dir(Path("/u"), local, "host-1")
    assert path == Path("/u/date=2024-12-31/hour=22/instance=host-1")


@pytest.mark.parametrize(
    ("instance_id", "folder"),
    [
        ("host-1234", "host-1234"),
        ("pod/a=b", "pod_a_b"),
        ("..hidden", "hidden"),
        ("", "_"),
        ("münchen 1", "m_nchen_1"),
    ],
)
def test_instance_ids_become_safe_folder_names(instance_id: str, folder: str) -> None:
    assert layout.safe_instance(instance_id) == folder


def test_part_names_match_the_reader_glob_and_temp_names_do_not() -> None:
    glob = layout.PART_GLOB.rsplit("/", 1)[-1]
    for compacted in (False, True):
        name = layout.part_name(1_700_000_000_000_000_000, "abcd1234", compacted=compacted)
        assert fnmatch.fnmatch(name, glob)
        assert layout.is_visible_part(name)
        temp = layout.temp_name(name)
        assert not fnmatch.fnmatch(temp, glob)
        assert not layout.is_visible_part(temp)
        assert temp.startswith(".")


def test_part_names_sort_by_creation_time() -> None:
    names = [layout.part_name(ns, "ffffffff") for ns in (9, 10, 1_000_000_000_000)]
    assert sorted(names) == names


def test_compacted_parts_are_recognised() -> None:
    assert layout.is_compacted_part(layout.part_name(1, "ab", compacted=True))
    assert not layout.is_compacted_part(layout.part_name(1, "ab"))


def test_hour_is_closed_only_after_the_grace_period() -> None:
    hour = datetime(2025, 5, 1, 10, tzinfo=UTC)
    assert not layout.is_hour_closed(hour, hour + timedelta(minutes=59), 600)
    assert not layout.is_hour_closed(hour, hour + timedelta(minutes=69, seconds=59), 600)
    assert layout.is_hour_closed(hour, hour + timedelta(minutes=70), 600)


@pytest.mark.parametrize(
    ("date_dir", "hour_dir", "expected"),
    [
        ("date=2025-05-01", "hour=07", datetime(2025, 5, 1, 7, tzinfo=UTC)),
        ("date=2025-05-01", "hour=24", None),
        ("date=2025-02-30", "hour=01", None),
        ("date=2025-05-01", "instance=x", None),
        ("usage.duckdb", "hour=01", None),
    ],
)
def test_partition_folder_names_parse_to_their_hour(
    date_dir: str, hour_dir: str, expected: datetime | None
) -> None:
    assert layout.parse_partition_hour(date_dir, hour_dir) == expected


def test_epoch_hours_round_trip() -> None:
    hour = datetime(2025, 5, 1, 7, tzinfo=UTC)
    assert layout.hour_of_epoch(int(hour.timestamp()) // 3600) == hour


def test_sql_strings_escape_quotes() -> None:
    assert layout.sql_string("/data/o'brien") == "'/data/o''brien'"
