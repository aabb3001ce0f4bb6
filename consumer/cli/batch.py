"""`opstream batch run FILE --out FILE`: a JSONL file of request bodies, answered into a
JSONL file of results, with a progress bar; re-running the same command resumes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.cli.table import print_table
from consumer.settings import Settings

if TYPE_CHECKING:
    from opstream_client import Signer
    from opstream_client.batch import BatchRunner, BatchSummary, ProgressPrinter

EXIT_INTERRUPTED = 130
EXIT_SEND_FAILED = 3


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add `opstream batch run` to the command line."""
    batch = subparsers.add_parser("batch", help="send a JSONL file of requests (resumable)")
    actions = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        parents=[common],
        help="send every line of FILE, write one result line per reply to --out",
        description="Send one request per line of FILE (a request body as in the contract), "
        "at most --concurrency at a time, and append each reply to --out as a line "
        '{"line", "request_id", "status", "result"|"error", "meta"}. Lines without a '
        "request_id get <batch id>-<line number>; running the same command again skips "
        "the lines that already have a result (Ctrl-C: stop, then resume).",
    )
    run.add_argument("file", type=Path, metavar="FILE", help="JSONL: one request body per line")
    run.add_argument("--out", type=Path, required=True, help="JSONL results (appended to)")
    run.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (16)")
    run.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each reply (120)"
    )
    run.add_argument(
        "--priority",
        choices=("batch", "interactive"),
        default="batch",
        help="for lines without a priority (batch: served when interactive work leaves room)",
    )
    run.add_argument(
        "--batch-id",
        default=None,
        help="prefix of the request ids the batch gives its lines "
        "(default: batch-<first 16 hex digits of the file's SHA-256>)",
    )
    run.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "off"),
        default="auto",
        help="auto: a bar on a terminal, progress lines otherwise (on stderr)",
    )
    run.add_argument(
        "--key-id", default=None, help="signing key id for every line (else each tenant's key)"
    )
    run.add_argument("--secret", default=None, help="signing secret for --key-id")
    run.set_defaults(func=cmd_batch_run)


def batch_signer(args: argparse.Namespace, settings: Settings) -> Signer | None:
    """Signs each line with --key-id/--secret, or with its tenant's first configured key
    (a tenant without one is sent unsigned); None when there is no key at all."""
    from consumer.cli.keys import tenant_keys
    from schemas.signing import Routing, sign

    if bool(args.key_id) != bool(args.secret):
        raise ValueError("give both --key-id and --secret")
    fixed = (args.key_id, args.secret) if args.key_id else None
    keys = {} if fixed else tenant_keys(settings)
    if fixed is None and not keys:
        return None

    def signer(body: bytes, tenant_id: str, routing: Routing) -> list[tuple[str, bytes]]:
        key = fixed or keys.get(tenant_id)
        if key is None:
            return []
        return sign(body, tenant_id, key[0], key[1], time.time(), routing)

    return signer


def _printer(mode: str) -> ProgressPrinter | None:
    from opstream_client.batch import ProgressPrinter

    if mode == "off":
        return None
    return ProgressPrinter(sys.stderr, tty=None if mode == "auto" else mode == "bar")


def _say(printer: ProgressPrinter | None, text: str) -> None:
    if printer is not None:
        printer.message(text)
    else:
        print(text, file=sys.stderr, flush=True)


def cmd_batch_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run or resume a batch; exit 0 when every line has an ok result, 1 when some have an
    error result, 3 when sending failed, 130 when interrupted (then resume)."""
    from opstream_client.batch import BatchError, BatchRunner, describe_error

    prog = "opstream batch run"
    if not settings.kafka.bootstrap_servers:
        print(f"{prog}: --bootstrap-servers is required", file=sys.stderr)
        return 2
    if args.concurrency < 1 or args.timeout <= 0:
        print(f"{prog}: --concurrency and --timeout must be positive", file=sys.stderr)
        return 2
    printer = _printer(args.progress)
    try:
        signer = batch_signer(args, settings)
        runner = BatchRunner(
            args.file,
            args.out,
            _not_connected,
            concurrency=args.concurrency,
            priority=args.priority,
            batch_id=args.batch_id,
            on_progress=printer,
        )
        runner.prepare()
    except (ValueError, BatchError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    todo = runner.total - runner.previous
    resumed = f", {runner.previous} already have a result in {args.out}" if runner.previous else ""
    _say(
        printer,
        f"{prog}: {runner.batch_id}: {runner.total} requests{resumed}; "
        f"sending {todo}, {args.concurrency} at a time",
    )
    if todo == 0:
        summary = runner.summary()
    else:
        try:
            summary = asyncio.run(_send_all(runner, args, settings, signer, printer))
        except Exception as exc:  # connecting failed: nothing was sent
            print(f"{prog}: {describe_error(exc)}", file=sys.stderr)
            return EXIT_SEND_FAILED
        except (KeyboardInterrupt, asyncio.CancelledError):  # a third Ctrl-C while closing
            print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
    return report(summary)


async def _not_connected(body: dict[str, Any]) -> Any:
    raise RuntimeError("not connected")


async def _send_all(
    runner: BatchRunner,
    args: argparse.Namespace,
    settings: Settings,
    signer: Signer | None,
    printer: ProgressPrinter | None,
) -> BatchSummary:
    """Connect, run the batch; the first SIGINT/SIGTERM stops sending and waits for the
    replies in flight, a second one (or one while connecting) quits at once."""
    from consumer.bus.security import aiokafka_security_kwargs
    from opstream_client import OperationsClient

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def on_signal() -> None:
        if runner.running and not runner.stopping:
            runner.stop()
            _say(
                printer,
                f"stopping: waiting for the {runner.progress().in_flight} replies in flight "
                "(Ctrl-C again to quit without them)",
            )
        else:
            main.cancel()

    handled = (signal.SIGINT, signal.SIGTERM)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal)
    options: dict[str, Any] = {}
    if "fetch_max_wait_ms" in settings.kafka.model_fields_set:
        options["fetch_max_wait_ms"] = settings.kafka.fetch_max_wait_ms
    client = OperationsClient(
        settings.kafka.bootstrap_servers or "",
        request_topic=settings.topics.requests,
        reply_topic=settings.topics.replies,
        timeout_s=args.timeout,
        signer=signer,
        client_options=aiokafka_security_kwargs(settings.security),
        **options,
    )
    try:
        await client.start()
        runner.send = client.request
        return await runner.run()
    except asyncio.CancelledError:
        main.uncancel()
        summary = runner.summary()
        summary.interrupted = True
        return summary
    finally:
        await client.close()  # also after a failed start (it leaves the producer open)
        for sig in handled:
            loop.remove_signal_handler(sig)


def _duration(seconds: float) -> str:
    from opstream_client.batch import format_duration

    return format_duration(seconds)


def report(summary: BatchSummary) -> int:
    """Print the summary table (stdout) and what to do next (stderr); the exit status."""
    codes = sorted(
        set(summary.all_codes) | set(summary.codes),
        key=lambda code: (code != "ok", -summary.all_codes[code], code),
    )
    rows: list[list[object]] = [
        [code, summary.codes[code], summary.all_codes[code]] for code in codes
    ]
    if summary.left:
        rows.append(["no result yet", "", summary.left])
    print_table(["RESULT", "THIS RUN", "ALL LINES"], rows, right={1, 2})
    print(
        f"{summary.batch_id}: {summary.total} requests; {summary.previous} had a result before "
        f"this run; {summary.done_this_run} this run in {_duration(summary.elapsed_s)} "
        f"({summary.rate:.1f} req/s); results in {summary.out_path}"
    )
    notes: list[str] = []
    if summary.truncated_bytes:
        notes.append(
            f"note: cut off a partial last line ({summary.truncated_bytes} bytes) of "
            f"{summary.out_path}, left by a run that was killed while writing it"
        )
    if summary.foreign:
        notes.append(
            f"note: {summary.out_path} also holds {summary.foreign} results for request ids "
            "that no line of this input has (left as they are)"
        )
    if summary.all_codes["duplicate_request"]:
        notes.append(
            f"note: {summary.all_codes['duplicate_request']} lines got duplicate_request: the "
            "service had already taken their request_id (see error.original_status), usually "
            "because an earlier run was killed after sending them; the service does not keep "
            "results, so theirs is not in the file"
        )
    resume = (
        f"{summary.left} lines have no result yet; run the same command again to resume "
        "(lines with a result are skipped; the others keep their request ids, so the "
        "service does not run any of them twice)"
    )
    status = 1 if summary.failed else 0
    if summary.aborted is not None:
        notes.append(f"stopped: sending failed ({summary.aborted}); {resume}")
        status = EXIT_SEND_FAILED
    elif summary.interrupted and summary.left:
        notes.append(f"interrupted: {resume}")
        status = EXIT_INTERRUPTED
    for note in notes:
        print(note, file=sys.stderr)
    return status
