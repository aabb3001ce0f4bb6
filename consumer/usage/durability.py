"""DESIGN's steps 6-7: what must be durable before a finished record's offset is committed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consumer.usage.rows import usage_row

if TYPE_CHECKING:
    from consumer.pipeline.outcome import Outcome
    from consumer.quota.store import QuotaStore
    from consumer.usage.writer import UsageReceipt, UsageWriter


class MakeDurable:
    """The intake's `make_durable`: the quota settlement is in Kafka and the usage row on
    disk. Called once per finished record, before its offset may be committed; a failed
    usage append is retried on the next call."""

    def __init__(
        self, *, quota: QuotaStore | None, usage: UsageWriter | None, instance_id: str
    ) -> None:
        self._quota = quota
        self._usage = usage
        self._instance_id = instance_id

    async def __call__(self, outcome: Outcome) -> None:
        if self._quota is not None and outcome.reservation is not None:
            await self._quota.persist(outcome.record.partition)
        if not outcome.leaves_usage_row:
            return  # forwarded or a repeat: the record that answers it leaves the usage row
        if self._usage is not None:
            receipt: UsageReceipt | None = outcome.usage_receipt
            if receipt is None or (receipt.done() and receipt.error is not None):
                receipt = self._usage.append_nowait(usage_row(outcome, self._instance_id))
                outcome.usage_receipt = receipt
            await receipt.wait()
