"""A writer killed with SIGKILL never leaves a partial file where readers look, nor loses a row
whose `append` had returned."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from consumer.usage import UsageSettings, connect_catalog
from consumer.usage.layout import PART_GLOB

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HELPER = HERE / "usage_writer_loop.py"


class GlobbingReader(threading.Thread):
    """Globs the tree in a loop and reads every visible file completely."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.files_read = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.root.glob(PART_GLOB):
                try:
                    pq.read_table(path)
                    self.files_read += 1
                except FileNotFoundError:
                    continue
                except Exception as exc:  # any other error means a reader saw a bad file
                    self.failures.append(f"{path.name}: {type(exc).__name__}: {exc}")


def start_writer(root: Path, instance: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(root), instance, "4000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_until_durable(
    proc: subprocess.Popen[str], rounds: int, timeout_s: float
) -> dict[str, int]:
    """Read the helper's output until it reported `rounds` durable batches."""
    assert proc.stdout is not None
    durable: dict[str, int] = {}
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < rounds:
        assert time.monotonic() < deadline, "writer made no progress"
        line = proc.stdout.readline()
        assert line, f"writer exited early: {proc.stderr.read() if proc.stderr else ''}"
        parts = line.split()
        if parts[0] == "durable":
            durable[parts[1]] = int(parts[2])
            seen += 1
    return durable


def test_sigkilled_writer_leaves_no_partial_file_and_loses_no_durable_row(tmp_path: Path) -> None:
    rng = random.Random(1234)
    reader = GlobbingReader(tmp_path)
    reader.start()
    durable: dict[str, int] = {}
    try:
        for kill in range(4):
            proc = start_writer(tmp_path, f"crashy-{kill}")
            try:
                durable.update(read_until_durable(proc, rounds=2, timeout_s=30))
                time.sleep(rng.uniform(0.0, 0.05))  # land the kill at a random point of a flush
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                # Whatever it printed before dying is durable as well.
                assert proc.stdout is not None
                for line in proc.stdout.read().splitlines():
                    parts = line.split()
                    if parts and parts[0] == "durable":
                        durable[parts[1]] = int(parts[2])
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        reader.stop.set()
        reader.join(timeout=10)

    assert reader.failures == []
    assert reader.files_read > 0
    for path in tmp_path.glob(PART_GLOB):
        pq.read_table(path)  # every visible file is complete
    conn = connect_catalog(UsageSettings(directory=tmp_path))
    for prefix, count in durable.items():
        row = conn.execute(
            "SELECT count(DISTINCT request_id) FROM usage WHERE request_id LIKE ? "
            "AND CAST(split_part(request_id, '-', -1) AS BIGINT) < ?",
            [f"{prefix}-%", count],
        ).fetchone()
        assert row is not None and row[0] == count, prefix
    conn.close()


def test_a_truncated_temp_file_is_invisible_to_the_views(tmp_path: Path) -> None:
    """What a kill mid-COPY leaves behind: a hidden, partial temp file the glob never lists."""
    settings = UsageSettings(directory=tmp_path)
    conn = connect_catalog(settings)
    folder = tmp_path / "date=2025-06-01/hour=09/instance=dead"
    folder.mkdir(parents=True)
    (folder / ".part-00000000000000000001-deadbeef.parquet.tmp").write_bytes(b"PAR1\x00garbage")
    row = conn.execute("SELECT count(*) FROM usage_raw").fetchone()
    assert row == (0,)
    conn.close()
