"""opstream's producer client: requests, streamed replies, cancel and batch jobs over Kafka.

Imports only the wire contract (`schemas`), aiokafka and pydantic (and the OpenTelemetry
API when it is installed): no server module.
"""

from opstream_client.batch import BatchRunner, BatchSummary, Progress, ProgressPrinter, run_batch
from opstream_client.client import OperationsClient, ReplyStream, Signer

__all__ = [
    "BatchRunner",
    "BatchSummary",
    "OperationsClient",
    "Progress",
    "ProgressPrinter",
    "ReplyStream",
    "Signer",
    "run_batch",
]
