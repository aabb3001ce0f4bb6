"""Tenant signing keys in memory: whether requests must be signed, and `KeyRing.verify`."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import SecretStr

from consumer.auth.keys_file import read_keys_file
from consumer.errors import Unauthorized
from consumer.settings.auth import (
    MAX_SKEW_S,
    AuthSettings,
    TenantKey,
)
from schemas.headers import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP_HEADER,
    VERSION_HEADER,
)
from schemas.signing import (
    ID_PATTERN,
    SIGNATURE_PATTERN,
    TIMESTAMP_PATTERN,
    Routing,
    compute_signature,
)

MIN_SECRET_CHARS = 16

# The request-id ledger (consumer/quota/ledger.py) keeps a charge, with the record's digest,
# for the quota day it was taken and the next: at least 23 h (24 h, less the hour a day
# loses to daylight saving). A signed record is accepted only while a verbatim copy of it
# would still be recognised there (see `KeyRing.verify`).
REPLAY_MEMORY_S = 23 * 3600

# aiokafka's ConsumerRecord.timestamp_type: who set the record's timestamp.
CREATE_TIME = 0
LOG_APPEND_TIME = 1


class SettingsWithAuth(Protocol):
    """The part of `Settings` that decides whether signatures are checked."""

    @property
    def profile(self) -> str: ...

    @property
    def auth(self) -> AuthSettings: ...


def auth_required(settings: SettingsWithAuth) -> bool:
    """Whether requests must be signed.

    True unless the profile is `dev` *and* `auth.required` is false. In any other profile
    `auth.required = false` is a configuration error (ValueError), not a silent no-op,
    so production can never run unauthenticated by accident.
    """
    if settings.auth.required:
        return True
    if settings.profile == "dev":
        return False
    raise ValueError(
        f"auth.required=false is only allowed with profile=dev (profile is {settings.profile!r})"
    )


class KeyRing:
    """Every tenant's signing keys; `verify` says which key signed a request, or why none did."""

    def __init__(
        self,
        keys: Mapping[str, Sequence[TenantKey]],
        *,
        max_skew_s: int = 300,
        accept_v1: bool = True,
    ) -> None:
        if not 1 <= max_skew_s <= MAX_SKEW_S:
            raise ValueError(f"max_skew_s must be between 1 and {MAX_SKEW_S} s")
        self.max_skew_s = max_skew_s
        # How old (by the consumer's clock) a signature may be: a copy of a record signed
        # this long ago, first taken at most max_skew_s before its signed time, is still
        # within the ledger's memory.
        self.max_age_s = REPLAY_MEMORY_S - max_skew_s
        self.accept_v1 = accept_v1
        self._keys: dict[str, tuple[str, SecretStr]] = {}
        for tenant_id, tenant_keys in keys.items():
            for key in tenant_keys:
                if len(key.secret.get_secret_value()) < MIN_SECRET_CHARS:
                    raise ValueError(
                        f"secret of key {key.key_id!r} is shorter than "
                        f"{MIN_SECRET_CHARS} characters"
                    )
                known = self._keys.get(key.key_id)
                if known is not None and (
                    known[0] != tenant_id
                    or known[1].get_secret_value() != key.secret.get_secret_value()
                ):
                    raise ValueError(f"key id {key.key_id!r} is configured twice, differently")
                self._keys[key.key_id] = (tenant_id, key.secret)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> KeyRing:
        """Keys from `settings.keys` and, when set, `settings.keys_file` (which must exist)."""
        merged: dict[str, list[TenantKey]] = {t: list(ks) for t, ks in settings.keys.items()}
        if settings.keys_file is not None:
            for tenant_id, keys in read_keys_file(settings.keys_file).items():
                merged.setdefault(tenant_id, []).extend(keys)
        return cls(merged, max_skew_s=settings.max_skew_s, accept_v1=settings.accept_v1_signatures)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing(keys={len(self._keys)}, tenants={len(self.tenants())})"

    def tenants(self) -> set[str]:
        """The tenants that have at least one key."""
        return {tenant for tenant, _ in self._keys.values()}

    def key_ids(self, tenant_id: str) -> list[str]:
        """The key ids of one tenant, sorted (never the secrets)."""
        return sorted(k for k, (tenant, _) in self._keys.items() if tenant == tenant_id)

    def verify(
        self,
        headers: Sequence[tuple[str, bytes]],
        body: bytes,
        tenant_id: str,
        now: float,
        routing: Routing = (b"", "", ""),
        *,
        record_timestamp_ms: int,
        timestamp_type: int = CREATE_TIME,
    ) -> str:
        """The id of the key that signed `body` for `tenant_id`, or `Unauthorized` saying why.

        `headers` are the Kafka message's headers, `body` its exact value bytes, `tenant_id`
        the tenant the decoded request claims, `now` the consumer's clock (unix seconds),
        `routing` the record's reply route as v2 signs it (`records.signed_routing`),
        `record_timestamp_ms`/`timestamp_type` the record's own Kafka timestamp and who set it.

        Freshness is measured against the record's timestamp, not against when it is
        processed: a backlog of any age is judged as it was produced, and a redelivery
        gets the verdict its first delivery got. Replays are the request-id ledger's to
        refuse; the two checks on the consumer's clock (not signed ahead of it, not older
        than the ledger remembers) keep every accepted record inside that ledger's window.
        """
        values = _signature_headers(headers)
        if not values:
            raise Unauthorized(
                "request is not signed: headers " + ", ".join(SIGNATURE_HEADERS) + " are required",
                reason="missing_signature",
            )
        missing = [name for name in SIGNATURE_HEADERS if name not in values]
        if missing:
            raise Unauthorized(
                f"missing signature header(s): {', '.join(missing)}", reason="missing_signature"
            )
        key_id = values[KEY_ID_HEADER]
        timestamp = values[TIMESTAMP_HEADER]
        signature = values[SIGNATURE_HEADER]
        if not ID_PATTERN.fullmatch(key_id):
            raise Unauthorized(
                f"{KEY_ID_HEADER} must match [A-Za-z0-9._:-]{{1,128}}", reason="malformed_signature"
            )
        if not TIMESTAMP_PATTERN.fullmatch(timestamp):
            raise Unauthorized(
                f"{TIMESTAMP_HEADER} must be whole unix seconds", reason="malformed_signature"
            )
        if not SIGNATURE_PATTERN.fullmatch(signature):
            raise Unauthorized(
                f"{SIGNATURE_HEADER} must be 64 hex digits (HMAC-SHA256)",
                reason="malformed_signature",
            )
        entry = self._keys.get(key_id)
        if entry is None:
            raise Unauthorized(f"unknown key id {key_id!r}", reason="unknown_key", key_id=key_id)
        owner, secret = entry
        if owner != tenant_id:
            # Do not say whose key it is.
            raise Unauthorized(
                f"key id {key_id!r} is not a key of tenant {tenant_id!r}",
                reason="wrong_tenant",
                key_id=key_id,
            )
        version = values.get(VERSION_HEADER, "1")
        if version not in ("1", "2"):
            raise Unauthorized(
                f"{VERSION_HEADER} must be 2 (or absent for v1)", reason="malformed_signature"
            )
        if version == "1" and not self.accept_v1:
            raise Unauthorized(
                f"signature scheme v1 is no longer accepted: sign v2 and send {VERSION_HEADER}: 2",
                reason="unsupported_scheme",
                key_id=key_id,
            )
        try:
            expected = compute_signature(
                body, tenant_id, key_id, timestamp, secret, routing if version == "2" else None
            )
        except ValueError as exc:
            raise Unauthorized(str(exc), reason="malformed_signature") from None
        if not hmac.compare_digest(expected, bytes.fromhex(signature)):
            signed = "body, tenant, key id and timestamp"
            if version == "2":
                signed += ", correlation id and reply topic/partition"
            raise Unauthorized(
                f"signature does not match the {signed}",
                reason="bad_signature",
                key_id=key_id,
            )
        # Checked after the MAC, so only a genuine producer learns that its clock is off.
        self._check_fresh(int(timestamp), record_timestamp_ms, timestamp_type, now, key_id)
        return key_id

    def _check_fresh(
        self, signed_at: int, record_timestamp_ms: int, timestamp_type: int, now: float, key_id: str
    ) -> None:
        """`Unauthorized` (stale) unless the signature was made when the record was produced,
        is not ahead of the consumer's clock, and is young enough for the replay guard."""
        if timestamp_type == LOG_APPEND_TIME:
            kind = "LogAppendTime (the broker's clock when it appended the record)"
            hint = "the producer's clock is off"
        else:
            kind = "CreateTime (the producer's clock when it sent the record)"
            hint = "sign when you produce and let the client set the record timestamp"
        skew = signed_at - record_timestamp_ms / 1000
        if abs(skew) > self.max_skew_s:
            raise Unauthorized(
                f"signature timestamp is {skew:+.0f} s from the record's {kind} "
                f"(allowed ±{self.max_skew_s} s): {hint}",
                reason="stale",
                key_id=key_id,
            )
        ahead = signed_at - now
        if ahead > self.max_skew_s:
            raise Unauthorized(
                f"signature timestamp is {ahead:.0f} s ahead of the consumer's clock "
                f"(allowed {self.max_skew_s} s): the producer's clock is off",
                reason="stale",
                key_id=key_id,
            )
        age = now - signed_at
        if age > self.max_age_s:
            raise Unauthorized(
                f"request was signed {age:.0f} s ago; older than {self.max_age_s} s is refused, "
                "because a replay of it could no longer be recognised",
                reason="stale",
                key_id=key_id,
            )


def _signature_headers(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """The signature headers present, decoded; a repeated one is refused as ambiguous."""
    found: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered not in SIGNATURE_HEADERS and lowered != VERSION_HEADER:
            continue
        if lowered in found:
            raise Unauthorized(
                f"header {lowered} appears more than once", reason="malformed_signature"
            )
        try:
            found[lowered] = (value or b"").decode("ascii").strip()
        except UnicodeDecodeError:
            raise Unauthorized(
                f"header {lowered} is not ASCII", reason="malformed_signature"
            ) from None
    return found
