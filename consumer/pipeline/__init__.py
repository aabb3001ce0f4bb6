"""The processing topology: one record in, one reply / dead letter / forwarded copy out."""

from consumer.pipeline.outcome import BrokerUnavailable, Outcome, RecordPublisher
from consumer.pipeline.processor import RequestProcessor

__all__ = ["BrokerUnavailable", "Outcome", "RecordPublisher", "RequestProcessor"]
