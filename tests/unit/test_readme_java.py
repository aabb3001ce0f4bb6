"""The README's Java (Spring Kafka) snippet compiles: taken from README.md, compiled with
`javac` against stub interfaces of the kafka-clients and spring-kafka types it uses
(skipped without a JDK). It is not run: no JVM Kafka client is installed here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

# The types the snippet names, with the signatures the real libraries give them.
STUBS = {
    "org/apache/kafka/common/header/Header.java": (
        "package org.apache.kafka.common.header;\n"
        "public interface Header { String key(); byte[] value(); }\n"
    ),
    "org/apache/kafka/common/header/Headers.java": (
        "package org.apache.kafka.common.header;\n"
        "public interface Headers extends Iterable<Header> {\n"
        "    Headers add(String key, byte[] value);\n"
        "    Header lastHeader(String key);\n"
        "}\n"
    ),
    "org/apache/kafka/common/Configurable.java": (
        "package org.apache.kafka.common;\n"
        "public interface Configurable { void configure(java.util.Map<String, ?> configs); }\n"
    ),
    "org/apache/kafka/clients/producer/RecordMetadata.java": (
        "package org.apache.kafka.clients.producer;\npublic final class RecordMetadata {}\n"
    ),
    "org/apache/kafka/clients/producer/ProducerRecord.java": (
        "package org.apache.kafka.clients.producer;\n"
        "import org.apache.kafka.common.header.Headers;\n"
        "public class ProducerRecord<K, V> {\n"
        "    public ProducerRecord(String topic, K key, V value) {}\n"
        "    public Headers headers() { return null; }\n"
        "    public K key() { return null; }\n"
        "    public V value() { return null; }\n"
        "}\n"
    ),
    "org/apache/kafka/clients/producer/ProducerInterceptor.java": (
        "package org.apache.kafka.clients.producer;\n"
        "public interface ProducerInterceptor<K, V>\n"
        "        extends org.apache.kafka.common.Configurable, AutoCloseable {\n"
        "    ProducerRecord<K, V> onSend(ProducerRecord<K, V> record);\n"
        "    void onAcknowledgement(RecordMetadata metadata, Exception exception);\n"
        "    void close();\n"
        "}\n"
    ),
    "org/apache/kafka/clients/consumer/ConsumerRecord.java": (
        "package org.apache.kafka.clients.consumer;\n"
        "public class ConsumerRecord<K, V> { public V value() { return null; } }\n"
    ),
    "org/springframework/kafka/support/KafkaHeaders.java": (
        "package org.springframework.kafka.support;\n"
        "public abstract class KafkaHeaders {\n"
        '    public static final String CORRELATION_ID = "kafka_correlationId";\n'
        '    public static final String REPLY_TOPIC = "kafka_replyTopic";\n'
        '    public static final String REPLY_PARTITION = "kafka_replyPartition";\n'
        "}\n"
    ),
    "org/springframework/kafka/requestreply/RequestReplyFuture.java": (
        "package org.springframework.kafka.requestreply;\n"
        "import org.apache.kafka.clients.consumer.ConsumerRecord;\n"
        "public class RequestReplyFuture<K, V, R>\n"
        "        extends java.util.concurrent.CompletableFuture<ConsumerRecord<K, R>> {}\n"
    ),
    "org/springframework/kafka/requestreply/ReplyingKafkaTemplate.java": (
        "package org.springframework.kafka.requestreply;\n"
        "import org.apache.kafka.clients.producer.ProducerRecord;\n"
        "public class ReplyingKafkaTemplate<K, V, R> {\n"
        "    public RequestReplyFuture<K, V, R> sendAndReceive(ProducerRecord<K, V> record) {\n"
        "        return null;\n"
        "    }\n"
        "}\n"
    ),
    # What a service supplies around the snippet: its key and an HMAC helper.
    "opstream/Keys.java": (
        "package opstream;\n"
        "public final class Keys {\n"
        '    public static final String KEY_ID = "acme-1";\n'
        '    public static final String SECRET = "acme-secret-from-keys-new";\n'
        "    public static String hmacSha256Hex(String key, String msg) { return msg; }\n"
        "}\n"
    ),
}
IMPORTS = """\
import static java.nio.charset.StandardCharsets.UTF_8;
import static opstream.Keys.*;

import java.nio.ByteBuffer;
import java.time.Instant;
import java.util.HexFormat;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.producer.ProducerInterceptor;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;
import org.springframework.kafka.requestreply.ReplyingKafkaTemplate;
import org.springframework.kafka.support.KafkaHeaders;
"""


def java_block(text: str) -> str:
    found = re.search(r"<!-- readme-recipe: java -->\n```java\n(.*?)\n```", text, re.DOTALL)
    assert found, "the README's Java snippet is no longer marked"
    return found.group(1)


def split_snippet(block: str) -> tuple[str, str]:
    """The snippet's class, and the statements after it (the call through the template)."""
    end = block.index("\n}\n") + 3
    return block[:end], block[end:]


def compile_snippet(block: str, folder: Path) -> subprocess.CompletedProcess[str]:
    for relative, source in STUBS.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    signer, call = split_snippet(block)
    (folder / "OpstreamSigner.java").write_text(IMPORTS + "\n" + signer)
    (folder / "Call.java").write_text(
        IMPORTS
        + "\nclass Call {\n"
        + "    ReplyingKafkaTemplate<String, String, String> template;\n"
        + "    String call() throws Exception {\n"
        + call
        + "\n        return reply;\n    }\n}\n"
    )
    sources = [str(p) for p in folder.rglob("*.java")]
    return subprocess.run(
        ["javac", "-d", str(folder / "out"), *sources],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) installed")
def test_the_readme_java_snippet_compiles_against_the_kafka_and_spring_types(
    tmp_path: Path,
) -> None:
    done = compile_snippet(java_block(README.read_text(encoding="utf-8")), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) installed")
def test_a_broken_java_snippet_does_not_compile(tmp_path: Path) -> None:
    block = java_block(README.read_text(encoding="utf-8"))
    broken = block.replace("h.lastHeader(KafkaHeaders.REPLY_PARTITION)", "h.last(KafkaHeaders.X)")
    assert broken != block
    assert compile_snippet(broken, tmp_path).returncode != 0
