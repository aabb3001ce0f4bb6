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
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from schemas.replies import OperationReply

PathLike = str | os.PathLike[str]
Send = Callable[[dict[str, Any]], Awaitable["OperationReply"]]
OnProgress = Callable[["Progress"], None]

LOCAL_CODES = ("invalid_line", "timeout", "bad_reply")
"""Error codes of results made here, not by the service."""

BATCH_ID = re.compile(r"^[\x21-\x7e]{1,100}$")  # request ids are printable ASCII, <= 128
FSYNC_INTERVAL_S = 1.0


class BatchError(Exception):
    """The batch cannot start (unreadable input, an output that belongs to another input)."""


# ── the plan: which lines to send ──


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


# ── the output: results already there, appending new ones ──


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


# ── progress ──


@dataclass(frozen=True)
class Progress:
    """Where a run stands. `ok`/`failed` count the whole output (earlier runs included),
    `done_this_run` only this run's results (the rate is of those)."""

    total: int
    ok: int
    failed: int
    previous: int
    done_this_run: int
    in_flight: int
    elapsed_s: float
    finished: bool = False

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def rate(self) -> float:
        """Results per second in this run."""
        return self.done_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None


def format_duration(seconds: float | None) -> str:
    """`59 s`, `4 min 10 s`, `2 h 05 min`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _counts(p: Progress) -> str:
    return (
        f"{p.done}/{p.total} ok {p.ok} failed {p.failed} · {p.rate:.1f} req/s"
        f" · ETA {format_duration(p.eta_s)}"
    )


def format_bar(p: Progress, width: int = 80) -> str:
    """One terminal line: `[#####.....] 512/1000 ok 500 failed 12 · 8.3 req/s · ETA 59 s`,
    the bar shrunk (or dropped) so that the line fits in `width` columns."""
    text = _counts(p) if not p.finished else _counts(p).rsplit(" · ETA", 1)[0]
    fraction = p.done / p.total if p.total else 1.0
    cells = min(30, width - len(text) - 3)
    if cells < 5:
        return text[: max(width, 1)]
    filled = min(cells, int(fraction * cells))
    return f"[{'#' * filled}{'.' * (cells - filled)}] {text}"


def format_line(p: Progress) -> str:
    """One progress line for a log: counts, percent, rate, ETA and elapsed time."""
    percent = 100.0 * p.done / p.total if p.total else 100.0
    return (
        f"batch: {p.done}/{p.total} ({percent:.0f}%) ok {p.ok} failed {p.failed}"
        f" · {p.rate:.1f} req/s · ETA {format_duration(p.eta_s)}"
        f" · elapsed {format_duration(p.elapsed_s)}"
    )


class ProgressPrinter:
    """Draws progress on `stream` (stderr): a bar redrawn in place on a terminal (at most
    every `redraw_s`), otherwise a plain line every `every_s` seconds or `every_percent`
    percent, and always a last one. `message()` prints a line without garbling the bar."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        width: int | None = None,
        redraw_s: float = 0.1,
        every_s: float = 10.0,
        every_percent: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._width = width
        self._redraw_s = redraw_s
        self._every_s = every_s
        self._every_percent = every_percent
        self._clock = clock
        self._last_at: float | None = None
        self._last_percent = 0.0
        self._last_done = -1
        self._drawn = False
        self._last: Progress | None = None

    def width(self) -> int:
        if self._width is not None:
            return self._width
        import shutil

        return shutil.get_terminal_size((80, 24)).columns

    def __call__(self, p: Progress) -> None:
        self._last = p
        now = self._clock()
        if self.tty:
            if p.finished or self._last_at is None or now - self._last_at >= self._redraw_s:
                self._draw(p)
                self._last_at = now
                if p.finished:
                    self.stream.write("\n")
                    self._drawn = False
                self.stream.flush()
            return
        percent = 100.0 * p.done / p.total if p.total else 100.0
        due = (
            (p.finished and p.done != self._last_done)
            or self._last_at is None
            or now - self._last_at >= self._every_s
            or percent - self._last_percent >= self._every_percent
        )
        if due:
            self.stream.write(format_line(p) + "\n")
            self.stream.flush()
            self._last_at = now
            self._last_percent = percent
            self._last_done = p.done

    def _draw(self, p: Progress) -> None:
        width = self.width()
        self.stream.write("\r" + format_bar(p, width - 1) + "\x1b[K")
        self._drawn = True

    def message(self, text: str) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K" + text + "\n")
            if self._last is not None:
                self._draw(self._last)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ── the run ──


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
