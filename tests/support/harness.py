"""Brokers, topics and consumer processes for tests that run the real service.

Every test gets its own topic names and consumer group (`TopicSet`), so tests can share
one broker. Consumers run as real processes (`ConsumerProcess`) configured through
OPSTREAM_* environment variables, exactly as an operator configures `opstream run`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.bus.devbroker import LocalBroker, free_port, start_local_broker
from consumer.bus.topic_reader import topic_partitions
from tests.support.waiting import wait_until, wait_until_blocking

if TYPE_CHECKING:
    from opstream_client import OperationsClient

REPO = Path(__file__).resolve().parents[2]

# Which broker the tests run on (README, "Tests and benchmarks"): Tansu, a process started
# for each use (the default), or Apache Kafka in Docker through testcontainers (`kafka`: one
# container for the whole run). KAFKA_BOOTSTRAP_SERVERS names a running broker of that kind
# instead of starting one.
BROKER_KIND = os.environ.get("OPSTREAM_TEST_BROKER", "tansu")
if BROKER_KIND not in ("tansu", "kafka"):
    raise RuntimeError(f"OPSTREAM_TEST_BROKER={BROKER_KIND!r}: expected tansu or kafka")
ON_TANSU = BROKER_KIND == "tansu"
# Tansu answers a fetch only after the whole fetch_max_wait_ms (DESIGN.md): keep it small
# there. Apache Kafka answers as soon as there is data: clients keep their default.
FETCH_MAX_WAIT_MS = 5 if ON_TANSU else 500
# Confluent's build of Apache Kafka (7.6 = Kafka 3.6), the image testcontainers' KafkaContainer
# is written for (its start script runs the image's /etc/confluent/docker scripts).
KAFKA_IMAGE = os.environ.get("OPSTREAM_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")


@functools.cache
def kafka_container() -> Any:
    """Apache Kafka in Docker (one KRaft node), started on first use and removed when the
    test run ends: a started testcontainers `KafkaContainer`."""
    import docker
    from testcontainers.community.kafka import KafkaContainer

    try:
        docker.from_env().ping()
    except (docker.errors.DockerException, OSError) as exc:
        raise RuntimeError(f"OPSTREAM_TEST_BROKER=kafka needs a Docker daemon: {exc}") from exc
    container = KafkaContainer(KAFKA_IMAGE).with_kraft()
    container.start(timeout=180)  # the first run pulls the image
    atexit.register(container.stop)
    return container


@dataclass
class Broker:
    """A Kafka-protocol broker for tests: Tansu we started, the run's Kafka container, or
    KAFKA_BOOTSTRAP_SERVERS."""

    bootstrap: str
    local: LocalBroker | None = field(default=None, repr=False)
    container: Any = field(default=None, repr=False)

    @classmethod
    def start(cls) -> Broker:
        """A broker for a test, a module or the session. On Tansu a new process each time (a
        test that may wedge it gets its own); Apache Kafka does not wedge, so every caller
        shares the run's one container (each test has its own topics and group anyway)."""
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if external:
            return cls(external)
        if not ON_TANSU:
            container = kafka_container()
            return cls(container.get_bootstrap_server(), container=container)
        local = start_local_broker(timeout_s=20.0)
        return cls(local.bootstrap_servers, local)

    @property
    def freezable(self) -> bool:
        """Whether `freeze` can stop this broker (not an external one)."""
        return self.local is not None or self.container is not None

    def freeze(self) -> None:
        """Stop the broker answering, its connections left open: SIGSTOP, or docker pause."""
        if self.local is not None:
            self.local.process.send_signal(signal.SIGSTOP)
        elif self.container is not None:
            self.container.get_wrapped_container().pause()
        else:
            raise RuntimeError("an external broker cannot be frozen")

    def thaw(self) -> None:
        """Let a frozen broker go on (SIGCONT, or docker unpause)."""
        if self.local is not None:
            self.local.process.send_signal(signal.SIGCONT)
        elif self.container is not None:
            self.container.get_wrapped_container().unpause()

    def stop(self) -> None:
        """Kill the Tansu process we started (a no-op for the shared Kafka container, which
        stops when the run ends, and for an external broker)."""
        if self.local is not None:
            self.local.stop(timeout_s=5.0)
            self.local = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass
class TopicSet:
    """One test's topics and consumer group (unique names on a shared broker)."""

    requests: str
    replies: str
    dlq: str
    state: str
    control: str
    group: str
    partitions: int = 12

    @classmethod
    def unique(cls, partitions: int = 12) -> TopicSet:
        tag = uuid.uuid4().hex[:10]
        return cls(
            requests=f"ops.requests.t{tag}",
            replies=f"ops.replies.t{tag}",
            dlq=f"ops.requests.dlq.t{tag}",
            state=f"ops.quota.state.t{tag}",
            control=f"ops.control.t{tag}",
            group=f"opstream-t{tag}",
            partitions=partitions,
        )

    def settings(self) -> dict[str, Any]:
        """The nested settings naming these topics (for `Settings(**...)` or `env_of`)."""
        return {
            "kafka": {"group_id": self.group, "fetch_max_wait_ms": FETCH_MAX_WAIT_MS},
            "topics": {
                "requests": self.requests,
                "replies": self.replies,
                "dlq": self.dlq,
                "request_partitions": self.partitions,
                "reply_partitions": 3,
                "dlq_partitions": 1,
            },
            "quota": {"state_topic": self.state, "control_topic": self.control},
        }


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge nested settings dicts (`extra` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def env_of(settings: Mapping[str, Any], prefix: str = "OPSTREAM_") -> dict[str, str]:
    """Flatten nested settings into OPSTREAM_A__B=value variables (JSON for lists/dicts)."""
    env: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping) and not key.endswith("keys"):
            env.update(env_of(value, name + "__"))
        elif isinstance(value, (list, dict)):
            env[name] = json.dumps(value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = str(value)
    return env


def base_settings(
    broker: Broker, topics: TopicSet, tmp: Path, *, auth: bool = False
) -> dict[str, Any]:
    """Settings for a test consumer: its topics, a private usage directory, fast flushes."""
    settings: dict[str, Any] = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "usage": {"directory": str(tmp / "usage"), "flush_age_s": 0.2},
        "intake": {"commit_interval_ms": 20, "shutdown_grace_s": 10},
        "logging": {"format": "json", "level": "INFO"},
    }
    if not auth:
        settings["profile"] = "dev"
        settings["auth"] = {"required": False}
    return merge(topics.settings(), settings)


# Tansu joins and rebalances a group in 5-40 s; a dead member is noticed after the session
# timeout. A shorter one (with heartbeats to match) keeps the tests that kill consumers quick.
FAST_GROUP = {"kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}}


def log_tail(path: Path | None, chars: int = 4000) -> str:
    """The end of a consumer's log, for an assertion message ("" when there is none)."""
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-chars:]


class ConsumerProcess:
    """`opstream run` (or the fake-engine variant) as a child process with its own HTTP port."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        *,
        fake_engine: bool = True,
        delay_s: float = 0.0,
        log_path: Path | None = None,
        instance_id: str | None = None,
        stepped: tuple[int, float, int] | None = None,
    ) -> None:
        """`stepped` (slots, step seconds, tokens per request): the real scheduler over a
        model-free backend (`tests.support.stepped_backend`) instead of the fake engine."""
        self.port = free_port()
        self.instance_id = instance_id or f"test-{uuid.uuid4().hex[:6]}"
        full = merge(
            settings,
            {"http": {"host": "127.0.0.1", "port": self.port}, "instance_id": self.instance_id},
        )
        self.env = {**os.environ, **env_of(full), "PYTHONPATH": str(REPO)}
        self.args = [sys.executable, "-m", "tests.support.consumer_main"]
        if stepped is not None:
            self.args += ["--stepped", ",".join(str(part) for part in stepped)]
        elif fake_engine:
            self.args += ["--fake-engine", "--delay", str(delay_s)]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
        return self

    def get(
        self, path: str, timeout_s: float = 2.0, *, admin_key: str | None = None
    ) -> tuple[int, Any]:
        """GET a route of the consumer's HTTP app (an admin route with `admin_key`):
        (status, decoded JSON or text)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if admin_key is not None:
            request.add_header("X-Admin-Key", admin_key)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Wait until /ready answers 200 (model loaded, partitions assigned)."""

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"consumer exited with {self.process.returncode}{self._tail()}")
            try:
                return self.get("/ready", timeout_s=1.0)[0] == 200
            except OSError:
                return False

        if not wait_until_blocking(ready, timeout_s, interval_s=0.2, raise_on_timeout=False):
            raise TimeoutError(f"consumer not ready within {timeout_s} s{self._tail()}")

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no commit (what a crash does)."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    def _tail(self) -> str:
        tail = log_tail(self.log_path)
        return "\n--- consumer log (tail) ---\n" + tail if tail else ""


async def ensure_test_topics(broker: Broker, topics: TopicSet) -> None:
    """Create the test's topics explicitly (auto-created ones get the wrong partition count)."""
    from consumer.cli.topics import ensure_all_topics
    from consumer.settings import Settings

    wanted = merge(topics.settings(), {"kafka": {"bootstrap_servers": broker.bootstrap}})
    settings = Settings(**wanted)
    await ensure_all_topics(settings)


async def new_topics(broker: Broker, partitions: int = 12) -> TopicSet:
    """A `TopicSet` of fresh names, created on `broker`."""
    topics = TopicSet.unique(partitions)
    await ensure_test_topics(broker, topics)
    return topics


def unique_topic(prefix: str) -> str:
    """A topic name no other test uses (the broker is shared, and Tansu forgets nothing)."""
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


async def create_topic(
    bootstrap: str, name: str, partitions: int, configs: Mapping[str, str] | None = None
) -> None:
    """Create one topic explicitly (auto-created topics get the broker's partition count)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=dict(configs or {}))]
        )
        for topic, code, *rest in response.topic_errors:
            if code != 0:
                raise RuntimeError(f"creating topic {topic} failed: error {code} {rest}")
    finally:
        await admin.close()


# ── positive markers: proof that something is finished, instead of a quiet period ──

# The header of the records `append_markers` writes (its value tells one call from another).
END_MARKER = "x-test-end-marker"


async def append_markers(
    bootstrap: str, topic: str, token: str, key: bytes | None = b"end-marker"
) -> dict[int, int]:
    """Append one marker record to every partition of `topic`; partition -> marker offset.

    A reader that has read a partition's marker has read every record written to that
    partition before it, so markers mark "the end of the topic as of now" (Tansu's
    ListOffsets is not reliable for that, see `group_committed`). Keyed by default:
    compacted topics refuse keyless records on Apache Kafka.
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        partitions = await producer.partitions_for(topic)
        sent = [
            await producer.send_and_wait(
                topic,
                b"{}",
                key=key,
                partition=p,
                headers=[(END_MARKER, token.encode())],
            )
            for p in sorted(partitions)
        ]
    finally:
        await producer.stop()
    return {m.partition: m.offset for m in sent}


async def group_committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset of each partition of `topic` (None: nothing committed).

    (Tansu's ListOffsets does not report the end of a partition written in multi-record
    batches correctly, so tests compare against the offsets their producer was given.)
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()  # not subscribed: it never joins the group, only reads offsets
    try:
        partitions = await topic_partitions(consumer, topic)
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        await consumer.stop()


async def wait_committed(
    bootstrap: str, group: str, topic: str, ends: dict[int, int], timeout_s: float
) -> dict[int, tuple[int | None, int]]:
    """Wait until the group committed up to `ends` (partition -> next offset); returns the
    partitions still behind as (committed, wanted), empty when none is."""
    behind: dict[int, tuple[int | None, int]] = {}

    async def caught_up() -> bool:
        committed = await group_committed(bootstrap, group, topic)
        behind.clear()
        behind.update(
            {p: (committed.get(p), end) for p, end in ends.items() if (committed.get(p) or 0) < end}
        )
        return not behind

    await wait_until(caught_up, timeout_s, interval_s=0.5, raise_on_timeout=False)
    return behind


def ends_of(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    """partition -> one past the highest offset among (partition, offset) positions."""
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


async def wait_requests_finished(bootstrap: str, topics: TopicSet, timeout_s: float) -> None:
    """Wait until the consumer group has finished every request published so far.

    Appends a marker record to every request partition and waits until the group committed
    past each one. A record is committed only once it, and every record before it in its
    partition, was finished (reply acknowledged, usage row durable), so nothing published
    before the markers can be answered or dead-lettered afterwards (unless a consumer
    crashes again). The markers themselves carry no correlation id: they are dead-lettered.
    """
    # Keyless, so the consumer does not forward them to a tenant's partition first.
    markers = await append_markers(bootstrap, topics.requests, uuid.uuid4().hex, key=None)
    positions = list(markers.items())
    behind = await wait_committed(
        bootstrap, topics.group, topics.requests, ends_of(positions), timeout_s
    )
    assert not behind, f"(committed, wanted) offsets of {topics.requests} still behind: {behind}"


async def probe_partitions(bootstrap: str, topic: str, timeout_s: float = 6.0) -> str:
    """Diagnostics for a failed test: can a fresh client produce to and fetch from each
    partition of `topic`? Returns a one-line report ("ok" or the partitions that are not)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    timeout_ms = int(timeout_s * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        request_timeout_ms=timeout_ms,
    )
    problems: list[str] = []
    try:
        await asyncio.wait_for(asyncio.gather(producer.start(), consumer.start()), timeout_s)
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        for number in partitions:
            tp = TopicPartition(topic, number)
            consumer.assign([tp])
            try:
                await asyncio.wait_for(consumer.seek_to_end(tp), timeout_s)
                await asyncio.wait_for(
                    producer.send_and_wait(topic, b"probe", key=b"probe", partition=number),
                    timeout_s,
                )
                got = await asyncio.wait_for(consumer.getmany(tp, timeout_ms=2000), timeout_s)
                if not got.get(tp):
                    problems.append(f"{number}: produced but not fetched")
            except Exception as exc:  # a diagnostic: report every kind of failure
                problems.append(f"{number}: {type(exc).__name__}")
        report = "; ".join(problems) or f"all {len(partitions)} partitions answer"
    except Exception as exc:
        report = f"broker unreachable: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(producer.stop(), consumer.stop()), timeout_s)
    return f"\n--- probe of {topic}: {report}"


async def broker_diagnosis(broker: Broker, topics: TopicSet, consumer: ConsumerProcess) -> str:
    """What to print when replies stop coming: the consumer's own view, and whether the
    broker still serves each partition of the reply and quota-state topics."""
    try:
        status, body = await asyncio.to_thread(consumer.get, "/ready", 2.0)
        view = f"\n--- consumer /ready: {status} {json.dumps(body)[:600]}"
    except OSError as exc:
        view = f"\n--- consumer /ready: {type(exc).__name__}"
    probes = [await probe_partitions(broker.bootstrap, t) for t in (topics.replies, topics.state)]
    return view + "".join(probes)


async def start_consumer(process: ConsumerProcess, timeout_s: float = 90.0) -> ConsumerProcess:
    """Start a consumer process and wait (off the event loop) until it is ready."""
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready, timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            process.kill()
        raise
    return process


def client_for(
    broker: Broker,
    topics: TopicSet,
    timeout_s: float = 60.0,
    *,
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
) -> OperationsClient:
    """An OperationsClient (not started) for `topics`, polling at the tests' fetch wait
    unless told another."""
    from opstream_client import OperationsClient

    return OperationsClient(
        broker.bootstrap,
        request_topic=topics.requests,
        reply_topic=topics.replies,
        timeout_s=timeout_s,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


@contextlib.asynccontextmanager
async def serving(
    broker: Broker,
    topics: TopicSet,
    settings: Mapping[str, Any],
    log_path: Path,
    *,
    client_timeout_s: float = 60.0,
) -> AsyncIterator[tuple[ConsumerProcess, OperationsClient]]:
    """A ready consumer on the real model and a started client for `topics`; both are
    stopped on the way out (the consumer also when the client fails to start)."""
    consumer = ConsumerProcess(settings, fake_engine=False, log_path=log_path)
    await start_consumer(consumer, timeout_s=120.0)
    client = client_for(broker, topics, timeout_s=client_timeout_s)
    try:
        await client.start()
    except BaseException:
        consumer.kill()
        raise
    try:
        yield consumer, client
    finally:
        await client.close()
        consumer.stop()
