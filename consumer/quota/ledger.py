"""The charges of a partition's tenants, and which record may run under a charged id (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, tzinfo

from consumer.errors import DuplicateRequest
from consumer.quota.days import day_of, resets_at
from consumer.quota.limit_book import LimitBook, Usage, first_trip, quota_exceeded
from schemas.quota import TOTAL, QuotaCharge, charge_key


@dataclass(frozen=True, slots=True)
class Charge:
    """What one request costs: its reserved token budget until settled, then the real count."""

    operation: str
    tokens: int
    settled: bool
    epoch: str | None
    charged_at: datetime
    origin: str | None = None
    """"topic/partition/offset" of the record charged (None: written before it was kept)."""
    fingerprint: str | None = None
    """Digest of that record's value and headers: tells a verbatim copy from a new request."""
    outcome: str | None = None
    """"ok" or the error code it ended with; None while it runs."""
    counted: bool = True
    """False once it ended without running the model: it keeps the id, counts nothing."""
    body_digest: str | None = None
    """Digest of the request's body alone (not its signature, timestamp or correlation id):
    a retry of the same request has the same one."""
    answer: str | None = None
    """The final reply (JSON, as published) once it ended for good: what a retry gets."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted request: hand it back to `settle` after generation."""

    partition: int
    tenant_id: str
    operation: str
    request_id: str
    day: date
    tokens: int
    resets_at: datetime
    duplicate: bool = False
    """True when this very record was charged before (a redelivery): run it, charge nothing."""


# A request that failed this way was charged no tokens and may be sent again, under the
# same request_id, as a new record: the new attempt replaces the old charge.
RETRYABLE_OUTCOMES = frozenset({"internal", "overloaded"})


def settled_charge(charge: Charge, outcome: str, *, ran: bool, tokens: int) -> Charge:
    """A charge once its request ended `outcome` ("ok" or an error code).

    `ran`: the model worked on it (an "ok" always did). What ran is charged: one request
    and the real token count, capped at what was reserved (a settle never raises a charge,
    because the freed tokens may already be granted to others). What never ran (deadline
    expired in the queue, overloaded, cancelled or failed before it started) is released:
    no request, no tokens, the id still remembered. A record that ran before and did not
    run this time (a redelivery) keeps its first charge and outcome.
    """
    if tokens < 0:
        raise ValueError("token counts must not be negative")
    if not charge.counted:
        return charge  # released already: counting it again would raise the charge
    if ran or outcome == "ok":
        return replace(charge, tokens=min(charge.tokens, tokens), settled=True, outcome=outcome)
    if charge.settled:
        return charge
    return replace(charge, tokens=0, settled=True, outcome=outcome, counted=False)


# Outcomes answered without running the model: the same record delivered again (a rebalance
# or crash before its commit) gets the same answer again, never a different one.
ANSWERED_UNRUN = frozenset({"overloaded", "deadline_exceeded", "cancelled"})


class AnsweredBefore(Exception):
    """The same record again, answered before without running (`outcome`): answer it alike."""

    def __init__(self, outcome: str) -> None:
        super().__init__(f"this record was answered {outcome} before")
        self.outcome = outcome


class StoredAnswer(Exception):
    """A retry of a finished request (same tenant, request_id and body): answer it with the
    stored reply, replayed; it is not run or charged."""

    def __init__(self, answer: str) -> None:
        super().__init__("a retry of a request answered before: its stored reply")
        self.answer = answer


class StillRunning(Exception):
    """A retry (same body, another record) of a request that has not finished yet."""


class RepeatedRecord(Exception):
    """A verbatim copy of a charged record at another offset (a producer retry, a replay, a
    second forward): it is not run again; the original's reply is the answer."""

    def __init__(self, original_status: str) -> None:
        super().__init__(f"repeat of a record already taken (original: {original_status})")
        self.original_status = original_status


def charge_status(charge: Charge) -> str:
    """How a charged request ended, as a reply names it ("in_progress" while it runs)."""
    return charge.outcome or "in_progress"


class TenantDay:
    """One tenant's charges on one day and the usage they add up to, per reset epoch."""

    __slots__ = ("_usage", "charges", "day", "tenant_id")

    def __init__(self, tenant_id: str, day: date) -> None:
        self.tenant_id = tenant_id
        self.day = day
        self.charges: dict[str, Charge] = {}
        self._usage: dict[tuple[str | None, str], Usage] = {}

    def put(self, request_id: str, charge: Charge) -> None:
        """Add or replace a request's charge, keeping the sums exact."""
        old = self.charges.get(request_id)
        if old is not None:
            self._count(old, -1)
        self.charges[request_id] = charge
        self._count(charge, +1)

    def usage(self, epoch: str | None, scope: str) -> Usage:
        """Usage of an operation (or `TOTAL`) counted in a reset epoch."""
        found = self._usage.get((epoch, scope))
        return Usage(found.requests, found.tokens) if found else Usage()

    def _count(self, charge: Charge, sign: int) -> None:
        requests = 1 if charge.counted else 0
        for scope in (charge.operation, TOTAL):
            usage = self._usage.setdefault((charge.epoch, scope), Usage())
            usage.requests += sign * requests
            usage.tokens += sign * charge.tokens


ChargeKey = tuple[str, date, str]


class QuotaLedger:
    """The charges of the tenants on one partition: reserve, settle, restore, and what to persist.

    Keeps today's and yesterday's tenant-days (yesterday for late settles and redeliveries
    across midnight); older days are dropped as the clock moves.
    """

    def __init__(self, partition: int, book: LimitBook, tz: tzinfo) -> None:
        self.partition = partition
        self.book = book
        self.tz = tz
        self._days: dict[tuple[str, date], TenantDay] = {}
        self._dirty: set[ChargeKey] = set()
        self._oldest_kept: date | None = None

    # reserve / settle

    def reserve(
        self,
        tenant_id: str,
        operation: str,
        request_id: str,
        input_tokens: int,
        max_tokens: int,
        now: datetime,
        *,
        origin: str | None = None,
        fingerprint: str | None = None,
        body_digest: str | None = None,
    ) -> Reservation:
        """Charge one request and its token budget, or raise QuotaExceeded for the tripped limit.

        A retry of a request that ended for good (same id and `body_digest`, another record)
        raises `StoredAnswer` with its reply; while that request still runs, `StillRunning`.

        A request_id already charged today or yesterday is only run again when it is the
        same record (`origin`: a redelivery, not charged again). Another record with that
        id is refused: `RepeatedRecord` when it is a verbatim copy (same `fingerprint`),
        `DuplicateRequest` otherwise, except that a new attempt may replace a charge that
        ended in a retryable failure. Without `origin` any repeat counts as a redelivery.

        An id whose request never ran (its charge released) holds no work: any record
        under it is decided again and charged like a new request, except the same record
        delivered again after it was answered without running (`AnsweredBefore`: answered
        alike, so a redelivery never changes an answer) and a verbatim copy at another
        offset of one that is not retryable (deadline expired, cancelled): its original
        answer stands (`RepeatedRecord`).
        """
        if operation == TOTAL:
            raise ValueError("a request's operation cannot be the total scope")
        if input_tokens < 0 or max_tokens < 0:
            raise ValueError("token counts must not be negative")
        today = day_of(now, self.tz)
        self._roll(today)
        replaced: Charge | None = None
        for day in (today, today - timedelta(days=1)):
            earlier = self._days.get((tenant_id, day))
            charge = earlier.charges.get(request_id) if earlier else None
            if charge is None:
                continue
            same_record = origin is None or charge.origin is None or charge.origin == origin
            if not charge.counted:
                if same_record and origin is not None and charge.outcome in ANSWERED_UNRUN:
                    raise AnsweredBefore(charge.outcome)
                if (
                    not same_record
                    and charge.outcome not in RETRYABLE_OUTCOMES
                    and fingerprint is not None
                    and charge.fingerprint == fingerprint
                ):
                    raise RepeatedRecord(charge_status(charge))
                break  # nothing of it ran or counts: decided again, as a new request
            if same_record:
                # The same record again (a crash or rebalance redelivery): run, don't charge.
                return Reservation(
                    partition=self.partition,
                    tenant_id=tenant_id,
                    operation=charge.operation,
                    request_id=request_id,
                    day=day,
                    tokens=charge.tokens,
                    resets_at=resets_at(day, self.tz),
                    duplicate=True,
                )
            if day == today and charge.outcome in RETRYABLE_OUTCOMES:
                replaced = charge  # a new attempt after a retryable failure
                break
            if charge.answer is not None and body_digest is not None:
                if charge.body_digest == body_digest:
                    raise StoredAnswer(charge.answer)
            if fingerprint is not None and charge.fingerprint == fingerprint:
                raise RepeatedRecord(charge_status(charge))  # its original reply answers it
            if (
                charge.outcome is None
                and body_digest is not None
                and charge.body_digest == body_digest
            ):
                raise StillRunning()
            raise DuplicateRequest(
                f"request_id {request_id!r} was already used by another request "
                f"(status: {charge_status(charge)}); send a new request with a new request_id",
                original_status=charge_status(charge),
            )
        tenant_day = self._tenant_day(tenant_id, today)
        epoch = self.book.reset_epoch(tenant_id, today)
        tokens = input_tokens + max_tokens
        operation_used = tenant_day.usage(epoch, operation)
        total_used = tenant_day.usage(epoch, TOTAL)
        if replaced is not None and replaced.epoch == epoch:
            for used, scope in ((operation_used, operation), (total_used, TOTAL)):
                if scope in (replaced.operation, TOTAL):
                    used.requests -= 1
                    used.tokens -= replaced.tokens
        trip = first_trip(
            operation=operation,
            operation_cap=self.book.resolve(tenant_id, operation),
            operation_used=operation_used,
            total_cap=self.book.resolve(tenant_id, TOTAL),
            total_used=total_used,
            tokens=tokens,
        )
        if trip is not None:
            raise quota_exceeded(trip, day=today, tz=self.tz)
        tenant_day.put(
            request_id,
            Charge(
                operation=operation,
                tokens=tokens,
                settled=False,
                epoch=epoch,
                charged_at=now,
                origin=origin,
                fingerprint=fingerprint,
                body_digest=body_digest,
            ),
        )
        self._dirty.add((tenant_id, today, request_id))
        return Reservation(
            partition=self.partition,
            tenant_id=tenant_id,
            operation=operation,
            request_id=request_id,
            day=today,
            tokens=tokens,
            resets_at=resets_at(today, self.tz),
        )

    def settle(
        self,
        reservation: Reservation,
        input_tokens: int,
        output_tokens: int,
        outcome: str = "ok",
        *,
        ran: bool = True,
    ) -> None:
        """Lower the charge from the reserved budget to what ran and note the outcome; a
        request that never ran (`ran` False, outcome not "ok") is released.

        A settle never raises a charge: a real count above what is charged (more input
        tokens than estimated, or a redelivered request that generated more the second
        time) is capped, because the freed tokens may already be granted to others.
        So repeats are harmless, and the token limits hold exactly (`settled_charge`).
        """
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts must not be negative")
        tenant_day = self._days.get((reservation.tenant_id, reservation.day))
        charge = tenant_day.charges.get(reservation.request_id) if tenant_day else None
        if tenant_day is None or charge is None:
            return  # its day has rolled off: nothing left to correct
        settled = settled_charge(charge, outcome, ran=ran, tokens=input_tokens + output_tokens)
        if settled != charge:
            tenant_day.put(reservation.request_id, settled)
            self._dirty.add((reservation.tenant_id, reservation.day, reservation.request_id))

    def store_answer(self, reservation: Reservation, answer: str) -> bool:
        """Keep `answer`, the final reply, beside the charge of a request that ended for good
        (ran and not a retryable failure); False when it is not kept (see `reserve`). The
        first answer kept stays (a redelivered record that ran again is answered alike)."""
        tenant_day = self._days.get((reservation.tenant_id, reservation.day))
        charge = tenant_day.charges.get(reservation.request_id) if tenant_day else None
        if (
            tenant_day is None
            or charge is None
            or not charge.counted
            or charge.outcome is None
            or charge.outcome in RETRYABLE_OUTCOMES
        ):
            return False
        if charge.answer is None:
            tenant_day.put(reservation.request_id, replace(charge, answer=answer))
            self._dirty.add((reservation.tenant_id, reservation.day, reservation.request_id))
        return True

    # restore / persist

    def load(self, record: QuotaCharge, now: datetime) -> None:
        """Apply one changelog record read back from the state topic."""
        self._roll(day_of(now, self.tz))
        if self._oldest_kept is not None and record.day < self._oldest_kept:
            return
        self._tenant_day(record.tenant_id, record.day).put(
            record.request_id,
            Charge(
                operation=record.operation,
                tokens=record.tokens,
                settled=record.settled,
                epoch=record.reset_epoch,
                charged_at=record.charged_at,
                origin=record.origin,
                fingerprint=record.fingerprint,
                outcome=record.outcome,
                counted=record.counted,
                body_digest=record.body_digest,
                answer=record.answer,
            ),
        )

    def take_dirty(self) -> list[tuple[ChargeKey, bytes, bytes]]:
        """The changed charges as (charge key, record key, record value), now marked clean."""
        out: list[tuple[ChargeKey, bytes, bytes]] = []
        for key in sorted(self._dirty):
            record = self.record(key)
            if record is not None:
                out.append((key, charge_key(*key), record.model_dump_json().encode()))
        self._dirty.clear()
        return out

    def mark_dirty(self, keys: Iterable[ChargeKey]) -> None:
        """Ask for these charges to be written again (their last write failed)."""
        self._dirty.update(keys)

    @property
    def dirty_count(self) -> int:
        """How many changed charges are not yet handed out for persisting."""
        return len(self._dirty)

    def record(self, key: ChargeKey) -> QuotaCharge | None:
        """The changelog record of one charge, or None if it is no longer kept."""
        tenant_id, day, request_id = key
        tenant_day = self._days.get((tenant_id, day))
        charge = tenant_day.charges.get(request_id) if tenant_day else None
        if charge is None:
            return None
        return QuotaCharge(
            tenant_id=tenant_id,
            day=day,
            request_id=request_id,
            operation=charge.operation,
            tokens=charge.tokens,
            settled=charge.settled,
            reset_epoch=charge.epoch,
            charged_at=charge.charged_at,
            origin=charge.origin,
            fingerprint=charge.fingerprint,
            outcome=charge.outcome,
            counted=charge.counted,
            body_digest=charge.body_digest,
            answer=charge.answer,
        )

    # views

    def charges(self) -> dict[ChargeKey, Charge]:
        """Every kept charge, by (tenant, day, request_id)."""
        return {
            (td.tenant_id, td.day, rid): charge
            for td in self._days.values()
            for rid, charge in td.charges.items()
        }

    def tenants(self, day: date) -> list[str]:
        """Tenants with charges on `day`."""
        return sorted(tenant for tenant, d in self._days if d == day)

    def usage(self, tenant_id: str, scope: str, now: datetime) -> Usage:
        """Today's usage of (tenant, operation or `TOTAL`) in the current reset epoch."""
        today = day_of(now, self.tz)
        tenant_day = self._days.get((tenant_id, today))
        if tenant_day is None:
            return Usage()
        return tenant_day.usage(self.book.reset_epoch(tenant_id, today), scope)

    def __iter__(self) -> Iterator[TenantDay]:
        return iter(list(self._days.values()))

    # internals

    def _tenant_day(self, tenant_id: str, day: date) -> TenantDay:
        found = self._days.get((tenant_id, day))
        if found is None:
            found = self._days[(tenant_id, day)] = TenantDay(tenant_id, day)
        return found

    def _roll(self, today: date) -> None:
        oldest = today - timedelta(days=1)
        if self._oldest_kept is not None and oldest <= self._oldest_kept:
            return
        self._oldest_kept = oldest
        for key in [key for key in self._days if key[1] < oldest]:
            del self._days[key]
        self._dirty = {key for key in self._dirty if key[1] >= oldest}
