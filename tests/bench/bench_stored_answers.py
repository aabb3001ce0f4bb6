"""What stored answers cost a partition's restore: bytes per charge record and the time to
parse and load a day's worth back into a ledger, with and without answers; with --kafka,
also `QuotaStore.restore` of that many records from a state topic on a Tansu broker of its
own (or KAFKA_BOOTSTRAP_SERVERS).

    python tests/bench/bench_stored_answers.py [--requests 100000] [--reply-bytes 1200] [--kafka]
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from _common import Broker, bench_parser  # first: puts the repository on sys.path

from consumer.bus.connection import KafkaConnection
from consumer.quota.ledger import QuotaLedger
from consumer.quota.limit_book import LimitBook, limit_defaults
from consumer.settings.quota import QuotaSettings
from schemas.quota import QuotaCharge


def charge_records(requests: int, reply_bytes: int) -> list[bytes]:
    now = datetime.now(UTC)
    answer = None
    if reply_bytes:
        text = "x" * max(0, reply_bytes - 300)
        answer = (
            '{"schema_version":1,"status":"ok","result":{"summary":"' + text + '",'
            '"sentence_count":3},"meta":{"operation":"summarize","model_used":"qwen2.5-7b",'
            '"input_chars":4000,"input_tokens":900,"output_tokens":120,"queue_ms":3.2,'
            '"execution_time_ms":812.5,"request_id":"r-0000000","timestamp":'
            '"2026-12-06T08:00:00Z","bus_ms":1.2,"total_ms":820.1}}'
        )
    out = []
    for i in range(requests):
        record = QuotaCharge(
            tenant_id=f"tenant-{i % 50}",
            day=now.date(),
            request_id=f"{i:032x}",
            operation="summarize",
            tokens=1020,
            settled=True,
            charged_at=now,
            origin=f"ops.requests.v1/3/{i}",
            fingerprint="f" * 32,
            outcome="ok",
            body_digest="b" * 32 if answer else None,
            answer=answer,
        )
        out.append(record.model_dump_json(exclude_none=True).encode())
    return out


def restore(values: list[bytes]) -> float:
    settings = QuotaSettings()
    ledger = QuotaLedger(3, LimitBook(limit_defaults(settings)), ZoneInfo("UTC"))
    now = datetime.now(UTC)
    started = time.perf_counter()
    for value in values:
        ledger.load(QuotaCharge.model_validate_json(value), now)
    return time.perf_counter() - started


async def kafka_restore(values: list[bytes]) -> float:
    """Write `values` to one partition of a fresh state topic, then time a restore of it."""
    import uuid

    from aiokafka import AIOKafkaProducer

    from consumer.quota.store import QuotaStore
    from tests.support.harness import create_topic

    with Broker.start() as broker:
        topic = f"bench.state.{uuid.uuid4().hex[:8]}"
        await create_topic(broker.bootstrap, topic, 1)
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, linger_ms=20, max_batch_size=1_048_576
        )
        await producer.start()
        try:
            for i, value in enumerate(values):
                await producer.send(topic, value=value, key=f"k{i}".encode(), partition=0)
            await producer.flush()
            settings = QuotaSettings(state_topic=topic, restore_timeout_s=600)
            store = QuotaStore(
                book=LimitBook(limit_defaults(settings)),
                settings=settings,
                producer=producer,
                connection=KafkaConnection(broker.bootstrap),
                fetch_max_wait_ms=100,
            )
            started = time.perf_counter()
            await store.restore({0})
            return time.perf_counter() - started
        finally:
            await producer.stop()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--reply-bytes", type=int, default=1_200)
    parser.add_argument("--kafka", action="store_true", help="also restore through a broker")
    args = parser.parse_args()
    for label, size in (("without answers", 0), ("with answers", args.reply_bytes)):
        values = charge_records(args.requests, size)
        total = sum(len(v) for v in values)
        seconds = restore(values)
        line = (
            f"{label:16} {args.requests} charges: {total / args.requests:7.0f} B/record, "
            f"{total / 1e6:7.1f} MB, parse+load {seconds:5.2f} s"
        )
        if args.kafka:
            import asyncio

            line += (
                f", QuotaStore.restore from the broker {asyncio.run(kafka_restore(values)):5.2f} s"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
