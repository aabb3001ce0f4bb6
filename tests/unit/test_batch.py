"""Batch jobs (`opstream_client/batch/`, `opstream batch run`) with a fake `send`: no Kafka."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer.cli import batch as cli_batch
from consumer.cli.main import build_parser
from opstream_client.batch import (
    BatchError,
    BatchRunner,
    Progress,
    ProgressPrinter,
    batch_id_of,
    format_bar,
    format_duration,
    format_line,
    plan_lines,
    read_results,
    run_batch,
)
from schemas.replies import OperationReply
from tests.support.waiting import wait_until


def ok_reply(body: dict[str, Any]) -> OperationReply:
    return OperationReply.model_validate(
        {
            "status": "ok",
            "result": {"label": "a", "confidence": 0.75, "scores": {"a": 0.75, "b": 0.25}},
            "meta": {
                "operation": body["operation"],
                "request_id": body["request_id"],
                "timestamp": datetime.now(UTC).isoformat(),
            },
        }
    )


def quota_reply(body: dict[str, Any]) -> OperationReply:
    return OperationReply.model_validate(
        {
            "status": "error",
            "error": {
                "code": "quota_exceeded",
                "message": "daily limit reached",
                "retryable": True,
                "http_status": 429,
                "limit": 3,
                "limit_name": "classify.requests",
            },
            "meta": {"request_id": body["request_id"], "timestamp": datetime.now(UTC).isoformat()},
        }
    )


def request(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "operation": "classify",
        "tenant_id": "acme",
        "text": f"text {i}",
        "categories": ["a", "b"],
        **extra,
    }


def write_input(path: Path, bodies: list[Any]) -> Path:
    lines = [b if isinstance(b, str) else json.dumps(b) for b in bodies]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class FakeService:
    """`send`: answers after `delay_s` (or when `gate` opens); records what it was sent."""

    def __init__(self, delay_s: float = 0.0, answer: Any = ok_reply) -> None:
        self.delay_s = delay_s
        self.answer = answer
        self.sent: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, body: dict[str, Any]) -> OperationReply:
        self.sent.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s * (1 + len(self.sent) % 3))
            reply: OperationReply = self.answer(body)
            return reply
        finally:
            self.in_flight -= 1


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_input(tmp_path / "requests.jsonl", [request(i) for i in range(40)])


async def test_never_more_than_concurrency_in_flight(source: Path, tmp_path: Path) -> None:
    service = FakeService(delay_s=0.002)
    summary = await run_batch(source, tmp_path / "out.jsonl", service, concurrency=5)
    assert service.max_in_flight == 5
    assert len(service.sent) == 40
    assert summary.codes == Counter(ok=40)
    assert summary.complete and summary.left == 0


async def test_results_are_written_as_they_arrive(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    release: dict[str, asyncio.Event] = {}

    all_released = False

    async def send(body: dict[str, Any]) -> OperationReply:
        event = release.setdefault(body["request_id"], asyncio.Event())
        if not all_released:
            await event.wait()
        return ok_reply(body)

    runner = BatchRunner(source, out, send, concurrency=4)
    task = asyncio.create_task(runner.run())
    await wait_until(lambda: len(release) == 4, interval_s=0.001)
    third = f"{runner.batch_id}-3"
    release[third].set()
    await wait_until(lambda: out.exists() and out.read_text(), interval_s=0.001)
    assert [r["request_id"] for r in results(out)] == [third]  # on disk before the others
    assert results(out)[0]["line"] == 3 and results(out)[0]["status"] == "ok"
    all_released = True
    for event in release.values():
        event.set()
    await task
    assert len(results(out)) == 40


async def test_request_ids_are_deterministic_per_input(source: Path, tmp_path: Path) -> None:
    first = plan_lines(source, batch_id_of(source))
    again = plan_lines(source, batch_id_of(source))
    assert [line.request_id for line in first] == [line.request_id for line in again]
    assert first[6].request_id == f"{batch_id_of(source)}-7"
    other = write_input(tmp_path / "other.jsonl", [request(i) for i in range(41)])
    assert batch_id_of(other) != batch_id_of(source)

    service = FakeService()
    await run_batch(source, tmp_path / "a.jsonl", service)
    assert sorted(b["request_id"] for b in service.sent) == sorted(
        line.request_id for line in first
    )


async def test_own_request_id_and_priority_are_kept(tmp_path: Path) -> None:
    source = write_input(
        tmp_path / "in.jsonl",
        [request(0, request_id="mine-1"), request(1, priority="interactive"), request(2)],
    )
    service = FakeService()
    await run_batch(source, tmp_path / "out.jsonl", service, concurrency=1)
    sent = {b["text"]: b for b in service.sent}
    assert sent["text 0"]["request_id"] == "mine-1"
    assert sent["text 0"]["priority"] == "batch"  # lines without one get the batch's
    assert sent["text 1"]["priority"] == "interactive"
    service = FakeService()
    await run_batch(source, tmp_path / "out2.jsonl", service, priority=None)
    assert all("priority" not in b for b in service.sent if b["text"] != "text 1")


async def test_bad_lines_become_error_results_and_are_not_sent(tmp_path: Path) -> None:
    source = write_input(
        tmp_path / "in.jsonl",
        [
            request(0),
            "not json",
            "[1, 2]",
            json.dumps({"operation": "classify", "text": "no tenant"}),
            "",
            json.dumps({"tenant_id": "acme"}),
            request(6, request_id="same"),
            request(7, request_id="same"),
            request(8, request_id=5),
            request(9),
        ],
    )
    out = tmp_path / "out.jsonl"
    service = FakeService()
    summary = await run_batch(source, out, service)
    assert sorted(b["text"] for b in service.sent) == ["text 0", "text 6", "text 9"]
    by_line = {r["line"]: r for r in results(out)}
    assert sorted(by_line) == [1, 2, 3, 4, 6, 7, 8, 9, 10]  # the blank line 5 is no request
    for number in (2, 3, 4, 6, 8, 9):
        assert by_line[number]["status"] == "error"
        assert by_line[number]["error"]["code"] == "invalid_line"
        assert by_line[number]["error"]["retryable"] is False
    assert "not JSON" in by_line[2]["error"]["message"]
    assert "not a JSON object" in by_line[3]["error"]["message"]
    assert "tenant_id" in by_line[4]["error"]["message"]
    assert "operation" in by_line[6]["error"]["message"]
    assert "also used by line 7" in by_line[8]["error"]["message"]
    assert len({r["request_id"] for r in results(out)}) == 9
    assert summary.codes == Counter(ok=3, invalid_line=6)
    assert summary.failed == 6


async def test_error_replies_and_timeouts_are_results(source: Path, tmp_path: Path) -> None:
    def answer(body: dict[str, Any]) -> OperationReply:
        n = int(body["text"].split()[1])
        if n % 10 == 1:
            raise TimeoutError
        if n % 10 == 2:
            raise ValueError("1 validation error for OperationReply\nstatus: ...")
        return quota_reply(body) if n >= 30 else ok_reply(body)

    out = tmp_path / "out.jsonl"
    summary = await run_batch(source, out, FakeService(answer=answer))
    assert summary.codes == Counter(ok=24, quota_exceeded=8, timeout=4, bad_reply=4)
    quota = next(r for r in results(out) if r.get("error", {}).get("code") == "quota_exceeded")
    assert quota["error"]["limit_name"] == "classify.requests"
    assert "meta" in quota and "schema_version" not in quota
    timeout = next(r for r in results(out) if r.get("error", {}).get("code") == "timeout")
    assert timeout["error"]["retryable"] is True and "meta" not in timeout
    # Every line has exactly one result: a re-run sends nothing.
    service = FakeService()
    again = await run_batch(source, out, service)
    assert service.sent == [] and again.previous == 40 and again.left == 0


async def test_a_transport_failure_stops_the_run_without_a_result(
    source: Path, tmp_path: Path
) -> None:
    def answer(body: dict[str, Any]) -> OperationReply:
        if body["text"] == "text 10":
            raise ConnectionError("broker gone")
        return ok_reply(body)

    out = tmp_path / "out.jsonl"
    summary = await run_batch(source, out, FakeService(answer=answer), concurrency=2)
    assert summary.aborted == "ConnectionError: broker gone"
    assert not summary.complete
    assert 10 <= summary.done_this_run < 40
    assert 11 not in {r["line"] for r in results(out)}  # its line (11) has no result
    assert summary.left == 40 - len(results(out))


async def test_resume_skips_done_lines_and_a_truncated_last_line(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    batch = batch_id_of(source)
    done = [
        json.dumps({"line": n, "request_id": f"{batch}-{n}", "status": "ok", "result": {}})
        for n in range(1, 11)
    ]
    partial = json.dumps({"line": 11, "request_id": f"{batch}-11", "status": "ok"})[:25]
    out.write_text("\n".join(done) + "\n" + partial, encoding="utf-8")
    service = FakeService()
    summary = await run_batch(source, out, service)
    assert sorted(int(b["request_id"].rsplit("-", 1)[1]) for b in service.sent) == list(
        range(11, 41)
    )
    assert summary.previous == 10 and summary.truncated_bytes == len(partial)
    lines = [r["line"] for r in results(out)]  # every line parses: the partial one is gone
    assert sorted(lines) == list(range(1, 41))


async def test_a_last_line_missing_only_its_newline_is_kept(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch = batch_id_of(source)
    out.write_text(json.dumps({"line": 1, "request_id": f"{batch}-1", "status": "ok"}))
    service = FakeService()
    summary = await run_batch(source, out, service)
    assert len(service.sent) == 39 and summary.truncated_bytes == 0
    assert sorted(r["line"] for r in results(out)) == list(range(1, 41))


async def test_cancelled_mid_run_then_resumed_gives_each_line_one_result(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    first = FakeService(delay_s=0.003)
    runner = BatchRunner(source, out, first, concurrency=6)
    task = asyncio.create_task(runner.run())
    await wait_until(lambda: runner.progress().done_this_run >= 12, interval_s=0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    written = results(out)
    assert 12 <= len(written) < 40  # what was written stays; the in-flight ones are lost
    in_flight_at_cancel = {b["request_id"] for b in first.sent} - {r["request_id"] for r in written}
    assert in_flight_at_cancel

    second = FakeService()
    summary = await run_batch(source, out, second, concurrency=6)
    assert summary.previous == len(written)
    resent = {b["request_id"] for b in second.sent}
    assert in_flight_at_cancel <= resent  # sent again under the same ids (idempotent)
    assert not resent & {r["request_id"] for r in written}
    final = results(out)
    assert sorted(r["line"] for r in final) == list(range(1, 41))
    assert len({r["request_id"] for r in final}) == 40


async def test_stop_waits_for_the_replies_in_flight(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    service = FakeService(delay_s=0.003)
    runner = BatchRunner(source, out, service, concurrency=4)
    task = asyncio.create_task(runner.run())
    await wait_until(lambda: runner.progress().done_this_run >= 8, interval_s=0.001)
    runner.stop()
    summary = await task
    assert summary.interrupted and not summary.complete
    assert len(service.sent) == len(results(out)) == summary.done_this_run  # none lost
    assert summary.left == 40 - summary.done_this_run


async def test_an_output_of_another_input_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    await run_batch(source, out, FakeService())
    edited = write_input(tmp_path / "edited.jsonl", [request(i) for i in range(41)])
    with pytest.raises(BatchError, match="none for a line"):
        BatchRunner(edited, out, FakeService()).prepare()
    # The earlier run's batch id keeps the old ids: only the new line is sent.
    service = FakeService()
    summary = await run_batch(edited, out, service, batch_id=batch_id_of(source))
    assert [b["text"] for b in service.sent] == ["text 40"] and summary.previous == 40


def test_read_results_counts_codes_and_unreadable_lines(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(
        '{"request_id": "a", "status": "ok"}\n'
        'garbage\n{"request_id": "b", "status": "error", "error": {"code": "timeout"}}\n'
    )
    found = read_results(out)
    assert found.codes == {"a": "ok", "b": "timeout"} and found.unreadable == 1
    assert read_results(tmp_path / "missing.jsonl").codes == {}


# ── progress ──


def progress(done: int, failed: int = 0, **kw: Any) -> Progress:
    defaults: dict[str, Any] = dict(
        total=1000, ok=done - failed, failed=failed, previous=0, done_this_run=done,
        in_flight=16, elapsed_s=done / 8.3 if done else 0.0,
    )  # fmt: skip
    return Progress(**{**defaults, **kw})


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(59.4) == "59 s"
    assert format_duration(250) == "4 min 10 s"
    assert format_duration(2 * 3600 + 5 * 60) == "2 h 05 min"


def test_format_bar() -> None:
    bar = format_bar(progress(512, failed=12), width=100)
    assert bar == (
        "[###############...............] 512/1000 ok 500 failed 12 · 8.3 req/s · ETA 59 s"
    )
    assert len(format_bar(progress(512, 12), width=60)) <= 60  # the bar shrinks to fit
    assert format_bar(progress(512, 12), width=40).startswith("512/1000")  # or goes
    assert format_bar(progress(0), width=100).endswith("0.0 req/s · ETA ?")
    finished = format_bar(progress(1000, finished=True), width=100)
    assert finished.startswith("[" + "#" * 30 + "]") and "ETA" not in finished


def test_progress_counts_earlier_runs_but_rates_this_one() -> None:
    p = progress(100, previous=400, ok=500, failed=0, elapsed_s=10.0)
    assert p.done == 500 and p.rate == 10.0 and p.eta_s == 50.0


def test_format_line() -> None:
    assert format_line(progress(512, failed=12, elapsed_s=61.7)) == (
        "batch: 512/1000 (51%) ok 500 failed 12 · 8.3 req/s · ETA 59 s · elapsed 1 min 02 s"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tty_printer_redraws_one_line_in_place() -> None:
    stream, clock = io.StringIO(), Clock()
    printer = ProgressPrinter(stream, tty=True, width=100, redraw_s=0.1, clock=clock)
    printer(progress(1))
    printer(progress(2))  # too soon: not drawn
    clock.now = 0.2
    printer(progress(3))
    printer.message("stopping: waiting")
    clock.now = 0.25
    printer(progress(1000, finished=True))

    def bar(p: Progress) -> str:
        return "\r" + format_bar(p, 99) + "\x1b[K"

    assert stream.getvalue() == (
        bar(progress(1))
        + bar(progress(3))  # progress(2) came too soon after the first draw
        + "\r\x1b[Kstopping: waiting\n"  # the bar cleared, the message, the bar again
        + bar(progress(3))
        + bar(progress(1000, finished=True))
        + "\n"
    )


def test_plain_printer_writes_a_line_every_interval_or_percent() -> None:
    stream, clock = io.StringIO(), Clock()
    printer = ProgressPrinter(stream, tty=False, every_s=10.0, every_percent=10.0, clock=clock)
    printer(progress(0))  # the first: always
    for done in range(1, 250):
        clock.now = done * 0.01
        printer(progress(done))  # 10% (100 of 1000) passes twice
    clock.now = 20.0
    printer(progress(260))  # 10 s passed
    printer(progress(261, finished=True))  # the last: always
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [
        "0/1000", "100/1000", "200/1000", "260/1000", "261/1000",
    ]  # fmt: skip
    assert "\r" not in stream.getvalue()


# ── the command line (no Kafka: a finished batch needs no connection) ──


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(
        ["batch", "run", "in.jsonl", "--out", "out.jsonl", "--concurrency", "4"]
    )
    assert args.func is cli_batch.cmd_batch_run
    assert args.concurrency == 4 and args.timeout == 120.0 and args.priority == "batch"


async def test_cli_on_a_finished_batch_prints_the_summary(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    await run_batch(source, out, FakeService(answer=lambda b: (
        quota_reply(b) if b["text"] == "text 3" else ok_reply(b))))  # fmt: skip
    args = build_parser().parse_args(
        ["batch", "run", str(source), "--out", str(out), "--bootstrap-servers", "unused:1",
         "--progress", "off"]
    )  # fmt: skip
    from consumer.settings import load_settings

    status = await asyncio.to_thread(
        cli_batch.cmd_batch_run, args, load_settings(None, kafka={"bootstrap_servers": "x:1"})
    )
    assert status == 1  # an error result
    captured = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:] for line in captured.out.splitlines()[2:4]}
    assert rows == {"ok": ["0", "39"], "quota_exceeded": ["0", "1"]}
    assert "40 already have a result" in captured.err and "sending 0" in captured.err


def test_report_exit_status_and_resume_hint(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opstream_client.batch import BatchSummary

    def summary(**kw: Any) -> BatchSummary:
        base: dict[str, Any] = dict(
            input_path=source, out_path=Path("out.jsonl"), batch_id="b", total=10, previous=4,
            codes=Counter(ok=3), all_codes=Counter(ok=7), elapsed_s=1.0,
        )  # fmt: skip
        return BatchSummary(**{**base, **kw})

    assert cli_batch.report(summary(interrupted=True)) == 130
    err = capsys.readouterr().err
    assert "interrupted: 3 lines have no result yet; run the same command again" in err
    assert cli_batch.report(summary(aborted="KafkaTimeoutError: x")) == 3
    assert cli_batch.report(summary(previous=7)) == 0
    dup = Counter(ok=9, duplicate_request=1)
    assert cli_batch.report(summary(previous=7, all_codes=dup)) == 1
    assert "1 lines got duplicate_request" in capsys.readouterr().err


def test_signer_uses_each_tenants_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumer.settings import load_settings

    settings = load_settings(
        None,
        auth={"keys": {"acme": [{"key_id": "acme-1", "secret": "s" * 32}]}},
    )
    args = argparse.Namespace(key_id=None, secret=None)
    signer = cli_batch.batch_signer(args, settings)
    assert signer is not None
    routing = (b"cid", "replies", "")
    headers = dict(signer(b"{}", "acme", routing))
    assert any(v == b"acme-1" for v in headers.values())
    assert signer(b"{}", "globex", routing) == []  # no key: sent unsigned
    fixed = cli_batch.batch_signer(argparse.Namespace(key_id="k-1", secret="t" * 32), settings)
    assert fixed is not None and b"k-1" in dict(fixed(b"{}", "globex", routing)).values()
    with pytest.raises(ValueError, match="both"):
        cli_batch.batch_signer(argparse.Namespace(key_id="k", secret=None), settings)


async def test_the_python_client_runs_a_batch(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opstream_client import OperationsClient

    client = OperationsClient("unused:1")  # not started: `request` is replaced
    timeouts: list[float | None] = []

    async def request(body: dict[str, Any], *, timeout_s: float | None = None) -> OperationReply:
        timeouts.append(timeout_s)
        return ok_reply(body)

    monkeypatch.setattr(client, "request", request)
    seen: list[Progress] = []
    out = tmp_path / "out.jsonl"
    summary = await client.run_batch(
        source, out, concurrency=3, timeout_s=7.0, on_progress=seen.append
    )
    assert summary.codes == Counter(ok=40) and timeouts == [7.0] * 40
    assert seen[-1].finished and seen[-1].done == 40
    assert (await client.run_batch(source, out)).previous == 40  # again: a resume


async def test_a_failing_output_stops_the_run(source: Path, tmp_path: Path) -> None:
    from opstream_client import batch

    runner = BatchRunner(source, tmp_path / "out.jsonl", FakeService(), concurrency=2)
    original = batch.ResultWriter.write
    calls = 0

    def write(self: batch.ResultWriter, record: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls >= 5:  # the disk is full from the 5th result on
            raise OSError(28, "No space left on device")
        original(self, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch.ResultWriter, "write", write)
        summary = await runner.run()
    assert summary.aborted is not None and "No space left" in summary.aborted
    assert summary.done_this_run == 4 == len(results(tmp_path / "out.jsonl"))


def test_describe_error() -> None:
    from opstream_client.batch import describe_error

    assert describe_error(ConnectionError("gone")) == "ConnectionError: gone"
    assert describe_error(TimeoutError()) == "TimeoutError"

    class KafkaError(Exception):
        def __str__(self) -> str:
            return "KafkaError: broker unreachable"

    assert describe_error(KafkaError()) == "KafkaError: broker unreachable"
