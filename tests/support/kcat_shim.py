"""A stand-in for `kcat` over confluent-kafka, for the options the README's recipe uses.

Debian's kcat (librdkafka 2.0.2) cannot talk to Tansu; confluent-kafka's wheel bundles a
current librdkafka. Like kcat: `-P` sends each stdin line as one record (without its newline);
`-C` assigns every partition (no group), prints records by `-f` (`%h` headers as `k=v,...`,
`%s` value, `%k` key, `%t` topic, `%p` partition, `%o` offset, `\\n`), and block-buffers its
stdout into a pipe unless `-u` is given; "% Reached end of topic ..." goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kcat")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("-P", dest="produce", action="store_true")
    mode.add_argument("-C", dest="consume", action="store_true")
    parser.add_argument("-b", dest="brokers", required=True)
    parser.add_argument("-t", dest="topic", required=True)
    parser.add_argument("-k", dest="key")
    parser.add_argument("-H", dest="headers", action="append", default=[])
    parser.add_argument("-u", dest="unbuffered", action="store_true")
    parser.add_argument("-o", dest="offset", default="beginning")
    parser.add_argument("-f", dest="format", default="%s\\n")
    parser.add_argument("-e", dest="exit_at_end", action="store_true")
    return parser.parse_args(argv)


def produce(args: argparse.Namespace) -> int:
    producer = Producer({"bootstrap.servers": args.brokers})
    headers = [tuple(h.split("=", 1)) for h in args.headers]
    failures: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for line in sys.stdin.buffer.read().split(b"\n"):
        if line:
            producer.produce(args.topic, line, key=args.key, headers=headers, on_delivery=delivered)
    producer.flush(30)
    for failure in failures:
        print(f"% ERROR: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _start_offset(spec: str, consumer: Consumer, topic: str, partition: int) -> int:
    if spec == "beginning":
        return OFFSET_BEGINNING
    if spec == "end":
        return OFFSET_END
    if spec.startswith("s@"):
        wanted = TopicPartition(topic, partition, int(spec[2:]))
        found = consumer.offsets_for_times([wanted], timeout=10)[0]
        return found.offset if found.offset >= 0 else OFFSET_END
    return int(spec)


def _render(fmt: str, msg: object) -> bytes:
    headers = ",".join(
        f"{k}={(v or b'').decode('utf-8', 'replace')}"
        for k, v in (msg.headers() or [])  # type: ignore[attr-defined]
    )
    fields = {
        "%h": headers,
        "%s": (msg.value() or b"").decode("utf-8", "replace"),  # type: ignore[attr-defined]
        "%k": (msg.key() or b"").decode("utf-8", "replace"),  # type: ignore[attr-defined]
        "%t": msg.topic(),  # type: ignore[attr-defined]
        "%p": str(msg.partition()),  # type: ignore[attr-defined]
        "%o": str(msg.offset()),  # type: ignore[attr-defined]
        "\\n": "\n",
    }
    out, i = [], 0
    while i < len(fmt):
        token = fmt[i : i + 2]
        if token in fields:
            out.append(fields[token])
            i += 2
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out).encode()


def consume(args: argparse.Namespace) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": "kcat-shim",  # required by the client; only assign() is used
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 20,
        }
    )
    metadata = consumer.list_topics(args.topic, timeout=10).topics[args.topic]
    partitions = sorted(metadata.partitions)
    consumer.assign(
        [
            TopicPartition(args.topic, p, _start_offset(args.offset, consumer, args.topic, p))
            for p in partitions
        ]
    )
    # Block-buffered into a pipe or file, as kcat's stdio is (whatever PYTHONUNBUFFERED says).
    out = open(sys.stdout.fileno(), "wb", buffering=8192, closefd=False)
    if sys.stdout.isatty():
        args.unbuffered = True
    at_end: set[int] = set()
    try:
        while True:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF
                    print(
                        f"% Reached end of topic {msg.topic()} [{msg.partition()}] "
                        f"at offset {msg.offset()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    at_end.add(msg.partition())
                    if args.exit_at_end and at_end == set(partitions):
                        return 0
                    continue
                print(f"% ERROR: {msg.error()}", file=sys.stderr, flush=True)
                return 1
            out.write(_render(args.format, msg))
            if args.unbuffered:
                out.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    return produce(args) if args.produce else consume(args)


if __name__ == "__main__":
    sys.exit(main())
