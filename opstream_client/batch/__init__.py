"""Batch jobs: a JSONL file of requests in, a JSONL file of results out, resumable.

Split by job: `plan` (which lines, which request ids), `results` (the output file),
`progress` (formatting and printing), `runner` (`BatchRunner`, `run_batch`).
"""

from opstream_client.batch.plan import (
    BATCH_ID,
    BatchError,
    Line,
    batch_id_of,
    parse_line,
    plan_lines,
)
from opstream_client.batch.progress import (
    Progress,
    ProgressPrinter,
    format_bar,
    format_duration,
    format_line,
)
from opstream_client.batch.results import (
    FSYNC_INTERVAL_S,
    Existing,
    ResultWriter,
    read_results,
    repair_last_line,
    result_code,
)
from opstream_client.batch.runner import (
    BatchRunner,
    BatchSummary,
    OnProgress,
    PathLike,
    Send,
    describe_error,
    local_error,
    run_batch,
)

__all__ = [
    "BATCH_ID",
    "FSYNC_INTERVAL_S",
    "BatchError",
    "BatchRunner",
    "BatchSummary",
    "Existing",
    "Line",
    "OnProgress",
    "PathLike",
    "Progress",
    "ProgressPrinter",
    "ResultWriter",
    "Send",
    "batch_id_of",
    "describe_error",
    "format_bar",
    "format_duration",
    "format_line",
    "local_error",
    "parse_line",
    "plan_lines",
    "read_results",
    "repair_last_line",
    "result_code",
    "run_batch",
]
