"""The request signature: what is signed, the Kafka headers that carry it, and `sign`.

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
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re

from pydantic import SecretStr

SCHEME = b"opstream-hmac-v1"
KEY_ID_HEADER = "x-opstream-key-id"
TIMESTAMP_HEADER = "x-opstream-timestamp"
SIGNATURE_HEADER = "x-opstream-signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)

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


def compute_signature(
    body: bytes, tenant_id: str, key_id: str, timestamp: str, secret: Secret
) -> bytes:
    """The raw 32-byte HMAC-SHA256 of the signing input."""
    message = signing_input(body, tenant_id, key_id, timestamp)
    return hmac.new(secret_bytes(secret), message, hashlib.sha256).digest()


def sign(
    body: bytes, tenant_id: str, key_id: str, secret: Secret, now: float
) -> list[tuple[str, bytes]]:
    """The three signature headers a producer adds to a request whose value is `body`.

    `now` is the producer's clock in unix seconds; it is truncated to whole seconds.
    """
    timestamp = str(math.floor(now))
    mac = compute_signature(body, tenant_id, key_id, timestamp, secret)
    return [
        (KEY_ID_HEADER, key_id.encode("ascii")),
        (TIMESTAMP_HEADER, timestamp.encode("ascii")),
        (SIGNATURE_HEADER, mac.hex().encode("ascii")),
    ]
