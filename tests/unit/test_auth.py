"""Request signatures: what `sign` produces and every reason `KeyRing.verify` refuses."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import Field, ValidationError

from consumer.auth import AuthSettings, KeyRing, TenantKey, auth_required, read_keys_file
from consumer.auth.keys import CREATE_TIME, LOG_APPEND_TIME, REPLAY_MEMORY_S
from consumer.errors import Unauthorized
from consumer.settings import Settings
from consumer.settings.auth import MAX_SKEW_S
from schemas.headers import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from schemas.signing import sign, signing_input

NOW = 1_750_000_000.0
NOW_MS = int(NOW * 1000)  # the record's Kafka timestamp, unless a test says otherwise
ACME_SECRET = "acme-secret-0123456789abcdef"
ACME_OLD_SECRET = "acme-old-secret-0123456789"
GLOBEX_SECRET = "globex-secret-0123456789abc"
BODY = b'{"tenant_id":"acme","operation":"summarize"}'


def ring(max_skew_s: int = 300) -> KeyRing:
    return KeyRing(
        {
            "acme": [
                TenantKey(key_id="acme-2", secret=ACME_SECRET),
                TenantKey(key_id="acme-1", secret=ACME_OLD_SECRET),
            ],
            "globex": [TenantKey(key_id="globex-1", secret=GLOBEX_SECRET)],
        },
        max_skew_s=max_skew_s,
    )


def refusal(headers: list[tuple[str, bytes]], body: bytes = BODY, tenant: str = "acme") -> str:
    with pytest.raises(Unauthorized) as caught:
        ring().verify(headers, body, tenant, NOW, record_timestamp_ms=NOW_MS)
    assert caught.value.code == "unauthorized"
    reason: str = caught.value.details["reason"]
    return reason


def replace_header(
    headers: list[tuple[str, bytes]], name: str, value: bytes
) -> list[tuple[str, bytes]]:
    return [(k, value if k == name else v) for k, v in headers]


def test_signed_request_verifies_and_names_the_key() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    assert ring().verify(headers, BODY, "acme", NOW, record_timestamp_ms=NOW_MS) == "acme-2"


def test_signature_is_the_documented_hmac_over_scheme_tenant_key_timestamp_body() -> None:
    headers = dict(sign(BODY, "acme", "acme-2", ACME_SECRET, NOW + 0.9))
    assert headers[TIMESTAMP_HEADER] == b"1750000000"
    message = b"opstream-hmac-v1\nacme\nacme-2\n1750000000\n" + BODY
    expected = hmac.new(ACME_SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected.encode()
    assert headers[KEY_ID_HEADER] == b"acme-2"


def test_every_key_of_a_tenant_verifies_during_rotation() -> None:
    old = sign(BODY, "acme", "acme-1", ACME_OLD_SECRET, NOW)
    assert ring().verify(old, BODY, "acme", NOW, record_timestamp_ms=NOW_MS) == "acme-1"


def test_unsigned_request_is_refused_as_missing_signature() -> None:
    assert refusal([("correlation_id", b"c1")]) == "missing_signature"


def test_request_missing_one_signature_header_is_refused() -> None:
    headers = [
        h for h in sign(BODY, "acme", "acme-2", ACME_SECRET, NOW) if h[0] != SIGNATURE_HEADER
    ]
    with pytest.raises(Unauthorized, match=SIGNATURE_HEADER):
        ring().verify(headers, BODY, "acme", NOW, record_timestamp_ms=NOW_MS)


def test_unknown_key_id_is_refused() -> None:
    headers = sign(BODY, "acme", "acme-9", ACME_SECRET, NOW)
    assert refusal(headers) == "unknown_key"


def test_key_of_another_tenant_is_refused_even_with_a_valid_signature() -> None:
    headers = sign(BODY, "acme", "globex-1", GLOBEX_SECRET, NOW)
    with pytest.raises(Unauthorized) as caught:
        ring().verify(headers, BODY, "acme", NOW, record_timestamp_ms=NOW_MS)
    assert caught.value.details["reason"] == "wrong_tenant"
    assert "globex" not in caught.value.message.replace("globex-1", "")


def test_tampered_body_is_refused() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    assert refusal(headers, body=BODY.replace(b"summarize", b"translate")) == "bad_signature"


def test_signature_made_for_another_tenant_with_the_right_key_is_refused() -> None:
    # The tenant is inside the MAC, not only looked up next to it.
    headers = sign(BODY, "globex", "acme-2", ACME_SECRET, NOW)
    assert refusal(headers) == "bad_signature"


def test_changed_timestamp_is_refused() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    forged = replace_header(headers, TIMESTAMP_HEADER, str(int(NOW) + 1).encode())
    assert refusal(forged) == "bad_signature"


def test_wrong_secret_is_refused() -> None:
    headers = sign(BODY, "acme", "acme-2", "not-the-acme-secret-at-all", NOW)
    assert refusal(headers) == "bad_signature"


# ── freshness: the signature against the record's own timestamp ──


def verdict(
    signed_at: float, *, produced_at: float, now: float, max_skew_s: int = 300, kind: int = 0
) -> str:
    """`ok`, or the reason a request signed at `signed_at`, in a record stamped `produced_at`,
    judged at `now` (the consumer's clock) is refused."""
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, signed_at)
    try:
        ring(max_skew_s).verify(
            headers,
            BODY,
            "acme",
            now,
            record_timestamp_ms=int(produced_at * 1000),
            timestamp_type=kind,
        )
    except Unauthorized as exc:
        return str(exc.details["reason"])
    return "ok"


@pytest.mark.parametrize("age_s", [0, 301, 3_600, 6 * 3600, REPLAY_MEMORY_S - 300])
def test_a_backlog_record_is_judged_by_its_own_timestamp_not_by_its_age(age_s: int) -> None:
    # Signed and produced together, processed `age_s` later (an outage, a deploy).
    assert verdict(NOW - age_s, produced_at=NOW - age_s, now=NOW) == "ok"


@pytest.mark.parametrize("kind", [CREATE_TIME, LOG_APPEND_TIME])
@pytest.mark.parametrize("offset", [-301, 301, -86_400])
def test_a_signature_far_from_its_records_timestamp_is_stale(offset: int, kind: int) -> None:
    assert verdict(NOW + offset, produced_at=NOW, now=NOW, kind=kind) == "stale"


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_a_signature_at_the_edge_of_the_skew_window_is_accepted(offset: int) -> None:
    assert verdict(NOW + offset, produced_at=NOW, now=NOW + 400) == "ok"


def test_the_refusal_names_the_records_timestamp_and_who_set_it() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW - 20)
    for kind, name in ((CREATE_TIME, "CreateTime"), (LOG_APPEND_TIME, "LogAppendTime")):
        with pytest.raises(Unauthorized, match=rf"-20 s from the record's {name}.*±10 s"):
            ring(max_skew_s=10).verify(
                headers, BODY, "acme", NOW, record_timestamp_ms=NOW_MS, timestamp_type=kind
            )


def test_a_producer_with_a_skewed_clock_is_served_because_one_clock_stamps_both() -> None:
    # Its clock is an hour behind (or ahead of) the consumer's: signature and CreateTime
    # both come from it, so they agree.
    assert verdict(NOW - 3_600, produced_at=NOW - 3_600 + 0.5, now=NOW) == "ok"


def test_a_record_signed_ahead_of_the_consumers_clock_is_stale() -> None:
    # A replayed copy must meet the ledger that saw the original: the original was taken
    # at most max_skew_s before its signed time.
    assert verdict(NOW + 301, produced_at=NOW + 301, now=NOW) == "stale"
    assert verdict(NOW + 300, produced_at=NOW + 300, now=NOW) == "ok"


def test_a_record_older_than_the_replay_guard_remembers_is_stale() -> None:
    # Past this age the ledger may have forgotten the original, so a copy with a forged
    # CreateTime could run again: refused, whatever the record's timestamp says.
    limit = REPLAY_MEMORY_S - 300
    assert ring().max_age_s == limit
    assert verdict(NOW - limit, produced_at=NOW - limit, now=NOW) == "ok"
    with pytest.raises(Unauthorized, match="could no longer be recognised"):
        ring().verify(
            sign(BODY, "acme", "acme-2", ACME_SECRET, NOW - limit - 1),
            BODY,
            "acme",
            NOW,
            record_timestamp_ms=int((NOW - limit - 1) * 1000),
        )


def test_a_redelivery_gets_the_verdict_its_first_delivery_got() -> None:
    # Answered ok, then redelivered after the skew window (a rebalance, a crash before
    # the commit): judged against the same record timestamp, it is ok again.
    first = verdict(NOW, produced_at=NOW, now=NOW + 1)
    again = verdict(NOW, produced_at=NOW, now=NOW + 10 * 300)
    assert first == again == "ok"


def test_the_skew_window_must_leave_room_for_the_replay_guard() -> None:
    with pytest.raises(ValueError, match="max_skew_s"):
        ring(max_skew_s=MAX_SKEW_S + 1)
    with pytest.raises(ValidationError):
        AuthSettings(max_skew_s=MAX_SKEW_S + 1)


def test_repeated_signature_header_is_refused_as_ambiguous() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    headers.append((KEY_ID_HEADER, b"acme-1"))
    assert refusal(headers) == "malformed_signature"


@pytest.mark.parametrize(
    ("name", "value"),
    [(SIGNATURE_HEADER, b"zz" * 32), (SIGNATURE_HEADER, b"abcd"), (TIMESTAMP_HEADER, b"17.5e9")],
)
def test_malformed_signature_headers_are_refused(name: str, value: bytes) -> None:
    headers = replace_header(sign(BODY, "acme", "acme-2", ACME_SECRET, NOW), name, value)
    assert refusal(headers) == "malformed_signature"


def test_fields_that_could_make_the_signed_string_ambiguous_are_rejected() -> None:
    with pytest.raises(ValueError, match="key id"):
        signing_input(b"", "acme", "k\n1", "1")
    with pytest.raises(ValueError, match="tenant id"):
        signing_input(b"", "acme\nk", "1", "1")
    with pytest.raises(ValueError, match="timestamp"):
        signing_input(b"", "acme", "k", "-1")


def test_secrets_do_not_appear_in_reprs() -> None:
    settings = AuthSettings(keys={"acme": [TenantKey(key_id="acme-2", secret=ACME_SECRET)]})
    for text in (repr(settings), str(settings), repr(ring()), settings.model_dump_json()):
        assert ACME_SECRET not in text


def test_short_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="acme-2") as caught:
        KeyRing({"acme": [TenantKey(key_id="acme-2", secret="tooshort")]})
    assert "tooshort" not in str(caught.value)


def test_one_key_id_for_two_tenants_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="configured twice"):
        KeyRing(
            {
                "acme": [TenantKey(key_id="shared", secret=ACME_SECRET)],
                "globex": [TenantKey(key_id="shared", secret=GLOBEX_SECRET)],
            }
        )


def test_keys_come_from_a_toml_file_merged_with_settings(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(
        f'[["acme"]]\nkey_id = "acme-2"\nsecret = "{ACME_SECRET}"\n\n'
        f'[["globex"]]\nkey_id = "globex-1"\nsecret = "{GLOBEX_SECRET}"\n\n'
        f'[["acme"]]\nkey_id = "acme-1"\nsecret = "{ACME_OLD_SECRET}"\n'
    )
    settings = AuthSettings(
        keys_file=keys_file,
        keys={"initech": [TenantKey(key_id="initech-1", secret="initech-secret-0123456789")]},
    )
    keyring = KeyRing.from_settings(settings)
    assert keyring.key_ids("acme") == ["acme-1", "acme-2"]
    assert keyring.tenants() == {"acme", "globex", "initech"}


def test_keys_come_from_a_json_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"acme": [{"key_id": "acme-2", "secret": ACME_SECRET}]}))
    keyring = KeyRing.from_settings(AuthSettings(keys_file=keys_file))
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    assert keyring.verify(headers, BODY, "acme", NOW, record_timestamp_ms=NOW_MS) == "acme-2"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("keys.toml", f'[["acme"]]\nkey_id = "acme-2"\nsecret = "{ACME_SECRET}'),
        ("keys.json", json.dumps({"acme": [{"key_id": "a b", "secret": ACME_SECRET}]})),
        ("keys.json", json.dumps({"acme": [{"key_id": "a", "secrte": ACME_SECRET}]})),
    ],
)
def test_bad_keys_file_error_does_not_echo_the_secret(tmp_path: Path, name: str, text: str) -> None:
    keys_file = tmp_path / name
    keys_file.write_text(text)
    with pytest.raises(ValueError) as caught:
        read_keys_file(keys_file)
    assert str(keys_file) in str(caught.value)
    assert ACME_SECRET not in str(caught.value)


def test_keys_arrive_as_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class SettingsWithAuth(Settings):
        auth: AuthSettings = Field(default_factory=AuthSettings)

    monkeypatch.setenv(
        "OPSTREAM_AUTH__KEYS", json.dumps({"acme": [{"key_id": "acme-2", "secret": ACME_SECRET}]})
    )
    monkeypatch.setenv("OPSTREAM_AUTH__MAX_SKEW_S", "60")
    settings = SettingsWithAuth()
    keyring = KeyRing.from_settings(settings.auth)
    assert keyring.key_ids("acme") == ["acme-2"]
    assert keyring.max_skew_s == 60


@pytest.mark.parametrize(
    ("profile", "required", "expected"),
    [("production", True, True), ("dev", True, True), ("dev", False, False)],
)
def test_auth_is_required_unless_dev_turns_it_off(
    profile: str, required: bool, expected: bool
) -> None:
    settings = SimpleNamespace(profile=profile, auth=AuthSettings(required=required))
    assert auth_required(settings) is expected


def test_production_cannot_turn_auth_off() -> None:
    settings = SimpleNamespace(profile="production", auth=AuthSettings(required=False))
    with pytest.raises(ValueError, match="profile=dev"):
        auth_required(settings)


# ── scheme v2: the reply route is signed too ──

ROUTE = (b"corr-1", "ops.replies.v1", "")


def test_v2_signature_is_the_documented_hmac_over_the_route() -> None:
    from schemas.headers import VERSION_HEADER

    headers = dict(sign(BODY, "acme", "acme-2", ACME_SECRET, NOW, ROUTE))
    assert headers[VERSION_HEADER] == b"2"
    message = (
        b"opstream-hmac-v2\nacme\nacme-2\n"
        + str(int(NOW)).encode()
        + b"\n"
        + b"corr-1".hex().encode()
        + b"\nops.replies.v1\n\n"
        + BODY
    )
    expected = hmac.new(ACME_SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER].decode() == expected
    assert (
        ring().verify(list(headers.items()), BODY, "acme", NOW, ROUTE, record_timestamp_ms=NOW_MS)
        == "acme-2"
    )


@pytest.mark.parametrize(
    "changed",
    [
        (b"corr-2", "ops.replies.v1", ""),  # another correlation id
        (b"corr-1", "ops.replies.attacker", ""),  # the answer sent elsewhere
        (b"corr-1", "ops.replies.v1", "3"),  # another reply partition
    ],
)
def test_v2_signature_refuses_a_record_whose_route_was_changed(
    changed: tuple[bytes, str, str],
) -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW, ROUTE)
    with pytest.raises(Unauthorized) as caught:
        ring().verify(headers, BODY, "acme", NOW, changed, record_timestamp_ms=NOW_MS)
    assert caught.value.details["reason"] == "bad_signature"


def test_v1_is_accepted_during_the_migration_and_refused_after_it() -> None:
    headers = sign(BODY, "acme", "acme-2", ACME_SECRET, NOW)
    assert ring().verify(headers, BODY, "acme", NOW, ROUTE, record_timestamp_ms=NOW_MS) == "acme-2"
    strict = KeyRing({"acme": [TenantKey(key_id="acme-2", secret=ACME_SECRET)]}, accept_v1=False)
    with pytest.raises(Unauthorized) as caught:
        strict.verify(headers, BODY, "acme", NOW, ROUTE, record_timestamp_ms=NOW_MS)
    assert caught.value.details["reason"] == "unsupported_scheme"


def test_an_unknown_signature_version_is_malformed() -> None:
    from schemas.headers import VERSION_HEADER

    headers = [*sign(BODY, "acme", "acme-2", ACME_SECRET, NOW), (VERSION_HEADER, b"7")]
    assert refusal(headers) == "malformed_signature"


# ── through the processor: a redelivery is answered as its first delivery was ──


class RepliesKept:
    """A RecordPublisher that keeps every record's value by topic."""

    def __init__(self) -> None:
        self.values: dict[str, list[bytes]] = {}

    async def send(self, topic: str, value: bytes, **_: object) -> None:
        self.values.setdefault(topic, []).append(value)


async def test_a_signed_request_redelivered_after_the_window_is_answered_ok_again() -> None:
    from consumer.bus.records import InboundRecord, signed_routing
    from consumer.pipeline import RequestProcessor
    from consumer.settings import OperationLimits
    from schemas.headers import CORRELATION_ID, REPLY_TO
    from schemas.replies import OperationReply
    from tests.support.fake_engine import FakeEngine
    from topics.catalog import TopicSettings

    topics = TopicSettings(requests="ops.requests.v1", replies="ops.replies.v1", dlq="ops.dlq.v1")
    body = json.dumps(
        {"operation": "classify", "tenant_id": "acme", "text": "Goal!", "categories": ["a", "b"]}
    ).encode()
    route = (b"cid-1", topics.replies, "")
    headers = (
        (CORRELATION_ID, b"cid-1"),
        (REPLY_TO, topics.replies.encode()),
        *sign(body, "acme", "acme-2", ACME_SECRET, NOW, route),
    )
    record = InboundRecord(
        topic=topics.requests,
        partition=0,
        offset=7,
        key=b"acme",
        value=body,
        headers=headers,
        timestamp_ms=NOW_MS,
        received_at=NOW,
    )
    assert signed_routing(record) == route
    clock = [NOW + 1]
    publisher = RepliesKept()
    processor = RequestProcessor(
        engine=FakeEngine(),
        publisher=publisher,
        topics=topics,
        limits=OperationLimits(),
        instance_id="unit-1",
        keyring=ring(max_skew_s=10),
        clock=lambda: clock[0],
    )
    first = await processor.process(record)
    clock[0] = NOW + 3_600  # redelivered an hour later, far past the 10 s window
    again = await processor.process(record)
    replies = [OperationReply.model_validate_json(v) for v in publisher.values[topics.replies]]
    assert (first.status, again.status) == ("ok", "ok")
    assert [r.status for r in replies] == ["ok", "ok"]
