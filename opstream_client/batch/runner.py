"""Batch jobs: a JSONL file of request bodies in, a JSONL file of results out, resumable.

`BatchRunner` sends each line of the input through a `send(body) -> OperationReply`
coroutine (`OperationsClient.request` in practice) with at most `concurrency` requests in
flight, and appends one result line to the output as each reply arrives:

    {"line": 7, "request_id": "batch-3f9c…-7", "status": "ok", "result": {...}, "meta": {...}}
    {"line": 8, "request_id": "…", "status": "error", "error": {"code": ..., ...}, "meta": {...}}

Every line gets a `request_id` (its own, or `<batch id>-<line number>` where the batch id
is taken from the SHA-256 of the input file), so a re-run of the same file gets the same
ids: lines whose id already has a result in the output are skipped, and a line that was
in flight when an earlier run died is not run twice by the service (`request_id` is its
idempotency key). Service error replies (quota_exceeded included), timeouts and input lines
that are not a request are results too; the local error codes are `invalid_line`,
`timeout` and `bad_reply`.

No Kafka here: the transport is the `send` callable; progress formatting is pure
(`format_bar`, `format_line`) and `ProgressPrinter` draws it on a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from opstream_client.batch.plan import (
    BATCH_ID,
    BatchError,
    Line,
    batch_id_of,
    parse_line,
    plan_lines,
)
from opstream_client.batch.progress import Progress
from opstream_client.batch.results import (
    Existing,
    ResultWriter,
    read_results,
    repair_last_line,
    result_code,
)

if TYPE_CHECKING:
    from schemas.replies import OperationReply

PathLike = str | os.PathLike[str]
Send = Callable[[dict[str, Any]], Awaitable["OperationReply"]]
OnProgress = Callable[["Progress"], None]


@dataclass
class BatchSummary:
    """How a run ended. `codes` counts this run's results ("ok" or an error code),
    `all_codes` every result in the output; `left` lines still have none."""

    input_path: Path
    out_path: Path
    batch_id: str
    total: int
    previous: int
    codes: Counter[str]
    all_codes: Counter[str]
    elapsed_s: float
    interrupted: bool = False
    aborted: str | None = None
    foreign: int = 0
    truncated_bytes: int = 0

    @property
    def done_this_run(self) -> int:
        return sum(self.codes.values())

    @property
    def left(self) -> int:
        return self.total - self.previous - self.done_this_run

    @property
    def rate(self) -> float:
        return self.done_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.all_codes.items() if code != "ok")

    @property
    def complete(self) -> bool:
        return self.left == 0 and not self.interrupted and self.aborted is None


def describe_error(exc: BaseException) -> str:
    """`Type: message`, without the type twice (aiokafka's messages start with it)."""
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def local_error(code: str, message: str, *, retryable: bool) -> dict[str, Any]:
    return {"code": code, "message": message, "retryable": retryable}


class BatchRunner:
    """One run over an input file; see the module docstring.

    `stop()` ends it gracefully: nothing more is sent, the requests in flight are awaited
    and written. Cancelling the task that awaits `run()` ends it at once: the requests in
    flight are abandoned (their lines have no result, a re-run sends them again under the
    same ids), what was written stays.
    """

    def __init__(
        self,
        input_path: PathLike,
        out_path: PathLike,
        send: Send,
        *,
        concurrency: int = 16,
        priority: str | None = "batch",
        batch_id: str | None = None,
        on_progress: OnProgress | None = None,
        tick_s: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if batch_id is not None and not BATCH_ID.fullmatch(batch_id):
            raise ValueError("batch id must be 1-100 printable ASCII characters, no spaces")
        self.input_path = Path(input_path)
        self.out_path = Path(out_path)
        self.send = send
        self.concurrency = concurrency
        self.priority = priority
        self._batch_id = batch_id
        self.on_progress = on_progress
        self.tick_s = tick_s
        self.stopping = False
        self.running = False
        self.aborted: str | None = None
        self._lines: list[Line] = []
        self._existing = Existing()
        self._previous = 0
        self._codes: Counter[str] = Counter()
        self._all: Counter[str] = Counter()
        self._in_flight = 0
        self.foreign = 0
        self._started = time.monotonic()
        self._interrupted = False
        self._prepared = False

    # ── before sending ──

    def prepare(self) -> None:
        """Read the input and the output; raises BatchError when they do not belong
        together. `run()` calls it when it was not called before."""
        if self._prepared:
            return
        if not self.input_path.is_file():
            raise BatchError(f"{self.input_path}: no such file")
        if self.out_path.exists() and self.out_path.samefile(self.input_path):
            raise BatchError("the output must not be the input file")
        batch_id = self._batch_id or batch_id_of(self.input_path)
        self._batch_id = batch_id
        self._lines = plan_lines(self.input_path, batch_id)
        existing = read_results(self.out_path)
        ids = {line.request_id for line in self._lines}
        matched = [rid for rid in existing.codes if rid in ids]
        foreign = len(existing.codes) - len(matched)
        if existing.codes and not matched:
            hint = next(iter(existing.codes))
            raise BatchError(
                f"{self.out_path} holds {len(existing.codes)} results, none for a line of "
                f"{self.input_path} (request ids here are {batch_id}-<line>, there e.g. "
                f"{hint!r}): the input changed since, or the output belongs to another batch. "
                "Write to another --out, or pass the earlier run's --batch-id."
            )
        cut = repair_last_line(self.out_path)
        if existing.truncated_bytes:  # cut off, or completed by its newline: read again
            existing = read_results(self.out_path)
        self._existing = existing
        self._existing.truncated_bytes = cut
        self.foreign = foreign
        self._all = Counter(code for rid, code in self._existing.codes.items() if rid in ids)
        self._previous = sum(self._all.values())
        self._prepared = True

    @property
    def batch_id(self) -> str:
        self.prepare()
        assert self._batch_id is not None
        return self._batch_id

    @property
    def total(self) -> int:
        self.prepare()
        return len(self._lines)

    @property
    def previous(self) -> int:
        self.prepare()
        return self._previous

    def pending(self) -> list[Line]:
        self.prepare()
        return [line for line in self._lines if line.request_id not in self._existing.codes]

    # ── sending ──

    def stop(self) -> None:
        """Send nothing more; `run()` returns once the requests in flight are answered."""
        self.stopping = True

    def progress(self, *, finished: bool = False) -> Progress:
        ok = self._all["ok"]
        return Progress(
            total=len(self._lines),
            ok=ok,
            failed=sum(self._all.values()) - ok,
            previous=self._previous,
            done_this_run=sum(self._codes.values()),
            in_flight=self._in_flight,
            elapsed_s=time.monotonic() - self._started,
            finished=finished,
        )

    def summary(self) -> BatchSummary:
        return BatchSummary(
            input_path=self.input_path,
            out_path=self.out_path,
            batch_id=self._batch_id or "",
            total=len(self._lines),
            previous=self._previous,
            codes=Counter(self._codes),
            all_codes=Counter(self._all),
            elapsed_s=time.monotonic() - self._started,
            interrupted=self._interrupted,
            aborted=self.aborted,
            foreign=self.foreign,
            truncated_bytes=self._existing.truncated_bytes,
        )

    async def run(self) -> BatchSummary:
        """Send every pending line; returns the summary (also after `stop()`). Raises
        CancelledError when cancelled, after closing the output."""
        self.prepare()
        self._started = time.monotonic()
        self.running = True
        writer = ResultWriter(self.out_path)
        ticker = asyncio.create_task(self._tick()) if self.on_progress else None
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.concurrency)
        self._report()
        try:
            with self.input_path.open("rb") as source:
                for line in self.pending():
                    if self.stopping:
                        break
                    body, problem = self._body(source, line)
                    if body is None:
                        error = local_error("invalid_line", problem or "", retryable=False)
                        self._record(writer, line, error)
                        continue
                    await slots.acquire()
                    if self.stopping:
                        slots.release()
                        break
                    self._in_flight += 1
                    task = asyncio.create_task(self._one(writer, line, body, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
        except asyncio.CancelledError:
            self._interrupted = True
            raise
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            writer.close()
            self.running = False
            if self.stopping and self.aborted is None and self.pending():
                self._interrupted = True
            self._report(finished=True)
        return self.summary()

    def _body(self, source: IO[bytes], line: Line) -> tuple[dict[str, Any] | None, str | None]:
        if line.problem is not None:
            return None, line.problem
        source.seek(line.offset)
        body, problem = parse_line(source.readline().rstrip(b"\r\n"))
        if body is None:  # the file changed under us
            return None, problem
        if not body.get("request_id"):
            body["request_id"] = line.request_id
        if self.priority is not None:
            body.setdefault("priority", self.priority)
        return body, None

    async def _one(
        self, writer: ResultWriter, line: Line, body: dict[str, Any], slots: asyncio.Semaphore
    ) -> None:
        try:
            try:
                reply = await self.send(body)
            except TimeoutError:
                error = local_error("timeout", "no reply in time", retryable=True)
                self._record(writer, line, error)
            except ValueError as exc:  # a reply that is not a valid OperationReply
                message = f"unreadable reply: {str(exc).splitlines()[0][:200]}"
                self._record(writer, line, local_error("bad_reply", message, retryable=False))
            except Exception as exc:  # the transport: nothing more can be sent
                if self.aborted is None:
                    self.aborted = describe_error(exc)
                self.stopping = True
            else:
                reply_json = reply.model_dump(mode="json", exclude_none=True)
                reply_json.pop("schema_version", None)
                self._record(writer, line, reply_json)
        finally:
            self._in_flight -= 1
            slots.release()

    def _record(self, writer: ResultWriter, line: Line, outcome: dict[str, Any]) -> None:
        """Write one result line. `outcome` is a reply's JSON, or a local error."""
        record: dict[str, Any] = {"line": line.number, "request_id": line.request_id}
        if "status" in outcome:
            record.update(outcome)
        else:
            record.update(status="error", error=outcome)
        try:
            writer.write(record)
        except OSError as exc:  # a full disk, say: stop, so the line stays without a result
            if self.aborted is None:
                self.aborted = f"writing {self.out_path}: {exc}"
            self.stopping = True
            return
        code = result_code(record)
        self._codes[code] += 1
        self._all[code] += 1
        self._existing.codes[line.request_id] = code
        self._report()

    def _report(self, *, finished: bool = False) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress(finished=finished))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._report()


async def run_batch(
    input_path: PathLike,
    out_path: PathLike,
    send: Send,
    *,
    concurrency: int = 16,
    priority: str | None = "batch",
    batch_id: str | None = None,
    on_progress: OnProgress | None = None,
) -> BatchSummary:
    """Run (or resume) a batch; see `BatchRunner`."""
    runner = BatchRunner(
        input_path,
        out_path,
        send,
        concurrency=concurrency,
        priority=priority,
        batch_id=batch_id,
        on_progress=on_progress,
    )
    return await runner.run()
