"""Start-up errors of the exllamav2 engine, and which GPU errors leave the device unusable."""

from __future__ import annotations

# CUDA errors after which every later call on the context fails too ("sticky" errors in the
# CUDA runtime documentation): the process must exit and a new one start. Out-of-memory is not
# among them; it fails one batch and the next one may run.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc error",
    "launch timed out",
    "an illegal address",
    "cuda error: unknown error",
)


class EngineConfigError(Exception):
    """The engine cannot start with these settings here; the message says what to change."""

    code = "engine_config"


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True if `exc` (or what caused it) is a CUDA error that poisons the whole context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if any(marker in text for marker in STICKY_CUDA_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False
