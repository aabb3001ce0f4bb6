"""The request signature (schemes v1 and v2): what is signed, and `sign` for producers.

Scheme `opstream-hmac-v1`. The producer computes

    HMAC-SHA256(key = secret.encode("utf-8"),
                msg = b"opstream-hmac-v1\\n" + tenant_id + b"\\n" + key_id + b"\\n"
                      + timestamp + b"\\n" + body)

where `tenant_id`, `key_id` and `timestamp` are UTF-8 (ASCII in practice), `timestamp` is
whole unix seconds in decimal, and `body` is the exact bytes of the Kafka message value.
None of the three fields may contain a newline (tenant and key ids are restricted to
`[A-Za-z0-9._:-]`, the timestamp to digits), so the string has exactly one parse: the
signature binds the tenant, the key, the time and every byte of the body.

It sends three headers: `x-opstream-key-id`, `x-opstream-timestamp` and
`x-opstream-signature`, the last being the MAC as 64 lowercase hex digits.
The secret is the string `opstream keys new` prints, used as-is (it is not base64-decoded).

Scheme `opstream-hmac-v2` (header `x-opstream-signature-version: 2`) also binds where the
answer goes, so a captured record cannot be replayed with its reply sent elsewhere:

    msg = b"opstream-hmac-v2\n" + tenant_id + b"\n" + key_id + b"\n" + timestamp + b"\n"
          + hex(correlation) + b"\n" + reply_topic + b"\n" + reply_partition + b"\n" + body

`correlation` is the raw bytes of the correlation header the reply will carry
(`correlation_id`, or Spring's `kafka_correlationId`, or SmallRye's `REPLY_CORRELATION_ID`)
in lowercase hex, `reply_topic` the reply topic header as sent (`reply_to`,
`kafka_replyTopic` or `REPLY_TOPIC`), `reply_partition` the requested reply partition in
decimal; each is empty when absent. The header names are in `schemas.headers`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re

from pydantic import SecretStr

from schemas.headers import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, VERSION_HEADER

SCHEME = b"opstream-hmac-v1"
SCHEME_V2 = b"opstream-hmac-v2"

# The same alphabet as the wire contract's tenant id; no newline can slip in.
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,12}")
SIGNATURE_PATTERN = re.compile(r"[0-9a-fA-F]{64}")

Secret = str | bytes | SecretStr


def secret_bytes(secret: Secret) -> bytes:
    """The HMAC key for a secret given as text, bytes or a `SecretStr`."""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if isinstance(secret, str):
        return secret.encode("utf-8")
    return secret


def signing_input(body: bytes, tenant_id: str, key_id: str, timestamp: str) -> bytes:
    """The exact bytes that are MACed; raises ValueError for a field that would be ambiguous."""
    if not ID_PATTERN.fullmatch(tenant_id):
        raise ValueError("tenant id must match [A-Za-z0-9._:-]{1,128}")
    if not ID_PATTERN.fullmatch(key_id):
        raise ValueError("key id must match [A-Za-z0-9._:-]{1,128}")
    if not TIMESTAMP_PATTERN.fullmatch(timestamp):
        raise ValueError("timestamp must be whole unix seconds in decimal")
    return b"\n".join(
        (SCHEME, tenant_id.encode("ascii"), key_id.encode("ascii"), timestamp.encode("ascii"), body)
    )


Routing = tuple[bytes, str, str]
"""What v2 signs besides v1's fields: (correlation bytes, reply topic, reply partition)."""


def signing_input_v2(
    body: bytes, tenant_id: str, key_id: str, timestamp: str, routing: Routing
) -> bytes:
    """The exact bytes v2 MACs: v1's fields, then the reply route, then the body."""
    correlation, reply_topic, reply_partition = routing
    if "\n" in reply_topic or "\n" in reply_partition:
        raise ValueError("reply topic and partition must not contain a newline")
    signing_input(b"", tenant_id, key_id, timestamp)  # the same field checks as v1
    return b"\n".join(
        (
            SCHEME_V2,
            tenant_id.encode("ascii"),
            key_id.encode("ascii"),
            timestamp.encode("ascii"),
            correlation.hex().encode("ascii"),
            reply_topic.encode("utf-8"),
            reply_partition.encode("ascii"),
            body,
        )
    )


def compute_signature(
    body: bytes,
    tenant_id: str,
    key_id: str,
    timestamp: str,
    secret: Secret,
    routing: Routing | None = None,
) -> bytes:
    """The raw 32-byte HMAC-SHA256 of the signing input (v2 when `routing` is given)."""
    if routing is None:
        message = signing_input(body, tenant_id, key_id, timestamp)
    else:
        message = signing_input_v2(body, tenant_id, key_id, timestamp, routing)
    return hmac.new(secret_bytes(secret), message, hashlib.sha256).digest()


def sign(
    body: bytes,
    tenant_id: str,
    key_id: str,
    secret: Secret,
    now: float,
    routing: Routing | None = None,
) -> list[tuple[str, bytes]]:
    """The signature headers a producer adds to a request whose value is `body`.

    With `routing` (correlation bytes, reply topic header, reply partition) it signs
    scheme v2 and adds the version header; without, v1. `now` is the producer's clock in
    unix seconds.
    """
    timestamp = str(math.floor(now))
    mac = compute_signature(body, tenant_id, key_id, timestamp, secret, routing)
    headers = [
        (KEY_ID_HEADER, key_id.encode("ascii")),
        (TIMESTAMP_HEADER, timestamp.encode("ascii")),
        (SIGNATURE_HEADER, mac.hex().encode("ascii")),
    ]
    if routing is not None:
        headers.append((VERSION_HEADER, b"2"))
    return headers
