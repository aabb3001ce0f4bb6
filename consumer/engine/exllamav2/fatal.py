"""What a lost GPU means here: the liveness check and the fatal exit."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# Exit status after the GPU is lost (sysexits EX_SOFTWARE): a supervisor restarts the process.
GPU_FATAL_EXIT_CODE = 70
# Called once, from the scheduler's thread, with the reason, when the GPU can no longer run work.
FatalHandler = Callable[[str], None]


def cuda_context_alive() -> bool:
    """False once the CUDA context is poisoned: then even a synchronize fails."""
    import torch

    try:
        torch.cuda.synchronize()
    except RuntimeError:
        log.warning("exl2_cuda_context_lost", exc_info=True)
        return False
    return True


def exit_process(reason: str) -> None:
    """The default reaction to a lost GPU: end the process now, with a non-zero status.

    A poisoned CUDA context cannot be repaired from inside the process. Exiting at once, like
    a crash, leaves the offsets of everything in flight uncommitted, so Kafka redelivers those
    records to the restarted (or another) instance instead of their producers getting errors.
    """
    log.critical("exl2_gpu_fatal_exit", extra={"code": GPU_FATAL_EXIT_CODE, "reason": reason})
    logging.shutdown()
    sys.stderr.flush()
    os._exit(GPU_FATAL_EXIT_CODE)
