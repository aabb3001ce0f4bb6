"""`opstream batch run` as a user runs it: a real broker, a real consumer, the CLI as a
child process that is interrupted (SIGINT) or killed (SIGKILL) mid-run and then re-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    REPO,
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    env_of,
    merge,
    new_topics,
)
from tests.support.waiting import wait_until_blocking

pytestmark = pytest.mark.integration

LINES = 40
QUOTA = 30  # classify requests per tenant per day, for the SIGKILL test


def write_requests(path: Path, count: int, tenant: str) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            body = {
                "operation": "classify",
                "tenant_id": tenant,
                "text": f"Review {i}: {'great, works well' if i % 2 else 'broke after a day'}",
                "categories": ["positive", "negative"],
            }
            f.write(json.dumps(body) + "\n")
    return path


def cli_env(broker: Broker, topics: TopicSet) -> dict[str, str]:
    settings = merge(topics.settings(), {"kafka": {"bootstrap_servers": broker.bootstrap}})
    return {**os.environ, **env_of(settings), "PYTHONPATH": str(REPO)}


def start_batch(env: dict[str, str], source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "consumer.cli", "batch", "run", str(source), "--out", str(out)]
    return subprocess.Popen(
        [*args, "--progress", "lines", "--timeout", "60", *extra],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_lines(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    text = out.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line]  # complete lines only


def assert_one_result_per_line(out: Path) -> list[dict[str, Any]]:
    found = result_lines(out)
    assert sorted(r["line"] for r in found) == list(range(1, LINES + 1))
    assert len({r["request_id"] for r in found}) == LINES
    return found


async def start(consumer: ConsumerProcess) -> ConsumerProcess:
    consumer.start()
    try:
        await asyncio.to_thread(consumer.wait_ready, 180.0)
    except BaseException:
        consumer.kill()
        raise
    return consumer


async def test_interrupted_batch_resumes_on_the_real_model(broker: Broker, tmp_path: Path) -> None:
    topics = await new_topics(broker)
    settings = merge(
        base_settings(broker, topics, tmp_path),
        {"engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 512}}},
    )
    consumer = await start(
        ConsumerProcess(settings, fake_engine=False, log_path=tmp_path / "consumer.log")
    )
    try:
        source = write_requests(tmp_path / "requests.jsonl", LINES, "tenant-batch")
        out = tmp_path / "results.jsonl"
        env = cli_env(broker, topics)

        first = start_batch(env, source, out, "--concurrency", "4")
        wait_until_blocking(lambda: len(result_lines(out)) >= 6 or first.poll() is not None, 120.0)
        first.send_signal(signal.SIGINT)  # stop sending, wait for the replies in flight
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 130, stderr
        assert "interrupted:" in stderr and "run the same command again" in stderr
        done_first = len(result_lines(out))
        assert 6 <= done_first < LINES, stderr
        assert "THIS RUN" in stdout

        second = start_batch(env, source, out, "--concurrency", "4")
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        assert f"{done_first} had a result before this run" in stdout, stdout
        assert f"{done_first} already have a result" in stderr
        found = assert_one_result_per_line(out)
        # Nothing was lost in flight (SIGINT waits for those replies): every line is ok.
        assert Counter(r["status"] for r in found) == {"ok": LINES}, [
            r.get("error") for r in found if r["status"] != "ok"
        ]
        assert all(r["result"]["label"] in ("positive", "negative") for r in found)
        assert all(r["meta"]["request_id"] == r["request_id"] for r in found)

        third = start_batch(env, source, out)  # complete: nothing is sent
        stdout, stderr = third.communicate(timeout=60)
        assert third.returncode == 0 and "sending 0" in stderr
    finally:
        consumer.stop()


async def test_killed_batch_resumes_without_double_charging(broker: Broker, tmp_path: Path) -> None:
    topics = await new_topics(broker)
    settings = merge(
        base_settings(broker, topics, tmp_path), {"quota": {"default_daily_requests": QUOTA}}
    )
    consumer = ConsumerProcess(
        settings, fake_engine=True, delay_s=0.05, log_path=tmp_path / "consumer.log"
    )
    await start(consumer)
    try:
        source = write_requests(tmp_path / "requests.jsonl", LINES, "tenant-kill")
        out = tmp_path / "results.jsonl"
        env = cli_env(broker, topics)

        first = start_batch(env, source, out, "--concurrency", "8")
        wait_until_blocking(lambda: len(result_lines(out)) >= 8 or first.poll() is not None, 60.0)
        first.kill()  # no goodbye: the replies in flight are lost
        first.communicate(timeout=30)
        done_first = len(result_lines(out))
        assert done_first < LINES

        second = start_batch(env, source, out, "--concurrency", "8")
        stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 1, stderr  # quota rejections are error results
        assert f"{done_first} had a result before this run" in stdout, stdout
        found = assert_one_result_per_line(out)
        codes = Counter(r["status"] if r["status"] == "ok" else r["error"]["code"] for r in found)
        # Each request id was charged once: a line whose reply the kill lost was re-sent
        # under the same id and body and got its stored reply (replayed), its real result,
        # not run (or charged) again — never duplicate_request.
        assert set(codes) <= {"ok", "quota_exceeded"}, codes
        assert codes["ok"] == QUOTA, codes
        assert codes["quota_exceeded"] == LINES - QUOTA, codes
    finally:
        consumer.stop()
